import json

from typer.testing import CliRunner

from dynllava.cli import app


def test_bench_decode_writes_results_for_every_backend_and_capacity(official_dir, export_dir, tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--model", str(official_dir), "--export", str(export_dir),
                                      "--out", str(out), "--batch", "1,2", "--live", "16", "--capacities", "64,256",
                                      "--rounds", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["machine"]["cpus"] >= 1
    seen = {(r["backend"], r["batch"], r["capacity"]) for r in data["rows"]}
    assert seen == {(b, n, c) for b in ("torch", "onnxruntime") for n in (1, 2) for c in (64, 256)}
    for r in data["rows"]:
        assert r["ms_per_step"] > 0 and abs(r["ms_per_token"] * r["batch"] - r["ms_per_step"]) < 1e-9
    assert (out / "results.md").read_text().startswith("| backend |")


def test_bench_rejects_a_live_length_that_does_not_fit(official_dir, export_dir, tmp_path):
    result = CliRunner().invoke(app, ["bench", "--model", str(official_dir), "--export", str(export_dir),
                                      "--out", str(tmp_path), "--live", "100", "--capacities", "64"])
    assert result.exit_code == 1 and "must fit" in result.stderr
