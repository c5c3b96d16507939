"""benchmarks/gpu_check.py's CPU dry run: every section runs on a small random base and writes its JSON."""

import json

from benchmarks.gpu_check import main


def test_the_gpu_check_dry_run_runs_every_section_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    # the tiny model keeps it to seconds; the committed dry run uses random:smollm2-135m cut to 2 layers
    rc = main(["--dry-run", "--base", "tiny-llama", "--lengths", "256", "--sections", "train", "sparse", "rng", "run",
               "--out", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0, r
    assert r["dry_run"] and r["command"].startswith("python benchmarks/gpu_check.py --dry-run")
    train = r["sections"]["train"]["methods"]
    assert set(train) >= {"lora", "lora+checkpointing", "factorized", "sparse", "head_ft", "backward_head residual"}
    assert all("error" not in m and m["weights_dtype"] == ["torch.float32"] for m in train.values()), train
    # checkpointing changes memory and time, never the numbers
    assert train["lora"]["loss"] == train["lora+checkpointing"]["loss"]
    kernels = {(row["mode"], row["kernel"]) for row in r["sections"]["sparse"]["rows"] if "error" not in row}
    assert {row.get("variant") for row in r["sections"]["sparse"]["rows"]} == {"sdpa", "quest", "learned"}
    assert kernels == {("forward", "sdpa"), ("forward", "gather"), ("train", "sdpa"), ("train", "gather")}
    assert r["sections"]["rng"]["bit_identical"] and r["sections"]["rng"]["resumed_from"] == 2
    run = r["sections"]["run"]
    assert run["model"] == "tiny-llama" and set(run["cells"]) == {"frozen", "lora", "head_ft", "backward_head"}
    assert all(c["test_ppl"] > 1 for c in run["cells"].values()), run
