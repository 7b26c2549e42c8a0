"""Task kinds: one MODEL_DIR format for classifiers and QTMnet, adapters chosen by TaskSpec.kind."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from shared.tasks import TASKS
from shared.training.kinds import kind_adapter


def test_qtm_model_dir_has_the_bundle_metadata_and_loads_through_load_bundle(tmp_path):
    import json

    from shared.qtm.bundle import save_qtmnet
    from shared.qtm.net import build_qtmnet
    from shared.training.bundle import load_bundle

    torch.manual_seed(3)
    model = build_qtmnet()
    save_qtmnet(model, tmp_path / "m", {"trained": "test"}, {"param_mae": 0.5})
    meta = json.loads((tmp_path / "m" / "configs" / "metadata.json").read_text())
    for field in ("monai_version", "pytorch_version", "numpy_version", "network_data_format", "format"):
        assert field in meta, field
    assert meta["task"] == "qtm" and meta["network"]["name"] == "qtmnet"
    loaded, meta2 = load_bundle(tmp_path / "m")
    assert meta2["metrics"] == {"param_mae": 0.5}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_kind_adapters_are_chosen_by_kind_not_by_task_name():
    assert kind_adapter(TASKS["grading"]) is None  # the loop's own classification path
    assert type(kind_adapter(TASKS["qtm"])).__name__ == "RegressionMapsAdapter"
    renamed = replace(TASKS["qtm"], name="perfusion")  # a new regression task needs no loop change
    assert kind_adapter(renamed) is kind_adapter(TASKS["qtm"])
    with pytest.raises(ValueError, match="no learning-core adapter for kind 'segmentation'"):
        kind_adapter(replace(TASKS["grading"], kind="segmentation"))


def test_pick_device_refuses_cuda_where_there_is_none(monkeypatch):
    from shared.device import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        pick_device("cuda")


def test_a_model_dir_from_the_seg_crop_preprocessing_is_refused(tmp_path):
    import json

    from shared.training import TrainConfig, build_task_model
    from shared.training.bundle import export_bundle, load_bundle

    spec = TASKS["grading"]
    cfg = TrainConfig(task="grading", network="small_cnn", input_size=(8, 8, 8))
    out = export_bundle(build_task_model(spec, cfg), spec, cfg, tmp_path / "m", {"mode": "test"})
    meta_path = out / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["preprocessing"] = {"crop": "tumour box (x2) if seg else brain box"}  # a version-1 bundle
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="preprocessing version 1 .*retrain"):
        load_bundle(out)
