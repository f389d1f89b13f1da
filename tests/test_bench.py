"""The benchmark's summary and plots, on synthetic records (no model run)."""

from jetspec_compile.bench import markdown, plot, summarize


def records():
    out = []
    for prompt in range(3):
        for method, tps in (("hf", 10.0), ("jetspec-b8", 15.0 + prompt)):
            rec = {"set": "s", "prompt": prompt, "method": method, "seconds": 2.0, "new_tokens": 20,
                   "tokens_per_second": tps, "identical": True, "warmup": prompt == 0, "rss_mb": 100.0}
            if method != "hf":
                rec.update(tau=2.0, histogram={"1": 3, "3": 3}, trace=[(0.1, 1), (0.5, 4)], draft_seconds=0.1,
                           verify_seconds=1.5)
            out.append(rec)
    return out


def test_summary_ratios_skip_warmup_and_plots_are_written(tmp_path):
    methods = ["hf", "jetspec-b8"]
    summary = summarize(records(), methods)
    entry = summary["s"]["jetspec-b8"]
    assert entry["speedup_min"] == 1.6 and entry["speedup_max"] == 1.7  # prompt 0 (warm-up) excluded
    assert entry["tau"] == 2.0 and entry["histogram"] == {1: 6, 3: 6}  # two counted prompts, summed
    assert "| s | jetspec-b8 |" in markdown(summary, methods)
    paths = plot({"summary": summary, "methods": methods, "records": records()}, tmp_path)
    assert len(paths) == 4 and all(p.stat().st_size > 1000 for p in paths)
