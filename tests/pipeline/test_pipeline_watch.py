"""watch_flow: merges when a watched folder gains a fine-tune, does nothing when nothing changed."""

from __future__ import annotations

import shutil

from pipeline_helpers import params_for


def test_watch_merges_new_fine_tunes_only(tiny_models, tmp_path, prefect_server):
    from flows.watch_flow import watch_flow

    watched = tmp_path / "finetunes"
    for name in ("ft-a", "ft-b"):
        shutil.copytree(tiny_models[name], watched / name)
    params = params_for(tiny_models, tmp_path, fine_tunes=(), eval_sets={}, experts={},
                        watch=[{"dir": str(watched)}])
    params["recipe"]["models"] = [{"model": str(watched / "ft-a")}]

    first = watch_flow(params)  # no merge of these inputs yet: merge
    assert first["changed"] and first["added"] == [str(watched / "ft-b")]
    assert sorted(first["merge"]["lambdas"]) == [str(watched / "ft-a"), str(watched / "ft-b")]

    quiet = watch_flow(params)  # nothing changed: no merge
    assert not quiet["changed"] and quiet["merge"] is None
    assert quiet["model_dir"] == first["model_dir"]
    assert all(k.startswith("download") for k in quiet["steps"])

    shutil.copytree(tiny_models["ft-c"], watched / "ft-c")
    (watched / ".ft-d.partial").mkdir()  # a folder still being copied in is not picked up
    shutil.copytree(tiny_models["ft-d"], watched / ".ft-d.partial" / "x")
    third = watch_flow(params)
    assert third["changed"] and third["added"] == [str(watched / "ft-b"), str(watched / "ft-c")]
    merged = third["merge"]
    assert str(watched / "ft-c") in merged["lambdas"] and len(merged["lambdas"]) == 3
    assert merged["steps"][f"compute_norms[{watched / 'ft-a'}]"] == "Cached"
    assert merged["steps"]["merge"] == "Completed"
    assert third["model_dir"] != first["model_dir"]
