"""Manifests: JSON and CSV, grouping, relative paths, clear errors."""

from __future__ import annotations

import json

import pytest

from cots.data.manifest import ManifestError, load_manifest


def test_json_with_string_or_list_captions_relative_to_its_folder(tmp_path):
    (tmp_path / "m.json").write_text(
        json.dumps(
            [
                {"image": "a.jpg", "caption": "a dog"},
                {"image": "b.jpg", "caption": ["a cat", "a kitten"]},
                {"image": "a.jpg", "caption": "a puppy"},
            ]
        )
    )
    entries = load_manifest(tmp_path / "m.json")
    assert [e.image for e in entries] == [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    assert entries[0].captions == ["a dog", "a puppy"] and entries[1].captions == ["a cat", "a kitten"]
    rooted = load_manifest(tmp_path / "m.json", image_root="/data/imgs")
    assert str(rooted[0].image) == "/data/imgs/a.jpg"


def test_csv_groups_rows_of_one_image_and_takes_column_names(tmp_path):
    (tmp_path / "m.csv").write_text("path,text\nx.png,first\ny.png,other\nx.png,second\n")
    entries = load_manifest(tmp_path / "m.csv", image_column="path", caption_column="text")
    assert [(e.image.name, e.captions) for e in entries] == [("x.png", ["first", "second"]), ("y.png", ["other"])]
    with pytest.raises(ManifestError, match="missing CSV column"):
        load_manifest(tmp_path / "m.csv")


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "not valid JSON"),
        ('{"image": "a.jpg"}', "expected a JSON list"),
        ('[{"caption": "no image"}]', "entry 0"),
        ('[{"image": "a.jpg", "caption": "ok"}, {"image": "b.jpg", "caption": 12345}]', r"entry 1: 'caption' .* int"),
        ('[{"image": "a.jpg", "caption": ["ok", ["nested"]]}]', r"entry 0: 'caption' .* list"),
        ('[{"image": "a.jpg", "caption": {"en": "a dog"}}]', r"entry 0: 'caption' .* dict"),
        ('[{"image": "a.jpg", "caption": ["ok", null]}]', r"entry 0: 'caption' .* NoneType"),
        ('[{"image": 7, "caption": "a dog"}]', r"entry 0 has no 'image' path \(got 7\)"),
    ],
)
def test_bad_manifests_name_the_file_and_the_problem(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ManifestError, match=message):
        load_manifest(tmp_path / "bad.json")
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "missing.json")


def test_csv_manifest_trains_end_to_end(make_cfg, tmp_path, data_dir):
    """data.train_manifest may be a CSV file."""
    import csv

    from cots.train import train

    train(make_cfg("trainer.max_steps=1", "trainer.limit_val_batches=0"))  # builds the synthetic set
    folder = data_dir / "synthetic-256-64"
    rows = json.loads((folder / "train.json").read_text())
    with (folder / "train.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for row in rows[:64]:
            for caption in row["caption"]:
                writer.writerow([row["image"], caption])
    _, objects = train(
        make_cfg(
            f"data.train_manifest={folder / 'train.csv'}",
            "trainer.max_steps=2",
            "trainer.precision=bf16-mixed",
            "cpu_bf16_fallback=false",  # bf16 autocast on the CPU too, emulated or not
        )
    )
    assert objects["trainer"].global_step == 2 and len(objects["datamodule"].train_set) == 192
