"""``moebench report --html / --plots / --format csv``: the page, the plots' data and the CSV, checked
against values computed here from the JSON, and the page opened in a headless browser where one exists."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from moebench.cli import main
from moebench.metrics import metric
from moebench.report import page as page_module
from moebench.report import plots as P
from tests.result_docs import result_doc, run_record

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _samples(median: float, n: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return (median * (1 + 0.2 * rng.random(n))).tolist()


def load_balance_doc() -> dict:
    """2 layers × 4 experts on 2 ranks; expert 3 of layer 1 far over the 1.5× gate."""
    loads = [[10, 12, 9, 9], [5, 6, 4, 25]]
    owner = [0, 1, 0, 1]
    layers = [
        {"layer": i, "expert_tokens": row, "rank_tokens": [row[0] + row[2], row[1] + row[3]]}
        for i, row in enumerate(loads)
    ]
    run = run_record({"load_cv": metric([0.1, 0.2], "ratio", "lower", exact=True)}, params={})
    run["details"] = {"batches": 3, "expert_to_rank": owner, "layers": layers}
    run["slo"] = [
        {"gate": "max_load_cv", "metric": "load_cv", "op": "max", "limit": 0.2, "value": 0.15, "pass": True},
        {
            "gate": "max_imbalance",
            "metric": "imbalance_max_mean",
            "op": "max",
            "limit": 1.5,
            "value": 2.5,
            "pass": False,
        },
    ]
    return result_doc([run], name="lb", kind="load_balance")


def latency_doc() -> dict:
    runs = [
        run_record({"step_time_s": metric(_samples(0.01 * w, n, w), "s", "lower")}, {"world_size": w}, world=w)
        for w, n in ((1, 37), (2, 100))
    ]
    return result_doc(runs, name="lat", kind="latency")


def sweep_doc() -> dict:
    """tokens_per_rank over 16..4096 (a 256× span: log axes) at two world sizes."""
    runs = []
    for world in (1, 2):
        for tokens in (16, 256, 4096):
            m = {"tokens_per_s_per_gpu": metric([tokens * 100.0 / world], "tokens/s", "higher")}
            if world > 1:
                m["a2a_busbw_gbps"] = metric([tokens / 1000], "GB/s", "higher")
            runs.append(run_record(m, {"world_size": world, "tokens_per_rank": tokens}, world=world))
    return result_doc(runs, name="sweep")


def overlap_doc() -> dict:
    runs = []
    for chunks in (1, 4):
        compute, exposed = _samples(0.03, 9, chunks), _samples(0.01 / chunks, 9, 10 + chunks)
        m = {
            "serial_step_time_s": metric(_samples(0.045, 9, 20 + chunks), "s", "lower"),
            "compute_only_time_s": metric(compute, "s", "lower"),
            "exposed_comm_s": metric(exposed, "s", "lower"),
            "step_time_s": metric([0.05], "s", "lower"),
        }
        runs.append(run_record(m, {"overlap_chunks": chunks}))
    return result_doc(runs, name="ovl")


def offload_doc() -> dict:
    runs = [
        run_record(
            {"cache_hit_rate": metric([slots / 8 * (1.1 if policy == "belady" else 1)], "ratio", "higher")},
            {"cache_slots": slots, "policy": policy},
            world=1,
        )
        for slots in (1, 2, 8)
        for policy in ("lru", "belady")
    ]
    return result_doc(runs, name="off")


def write_docs(folder: Path, docs: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for doc in docs:
        (folder / f"{doc['scenario']['scenario']['name']}.json").write_text(json.dumps(doc))
    return folder


ALL_DOCS = (load_balance_doc, latency_doc, sweep_doc, overlap_doc, offload_doc)


# -------------------------------------------------------------------------------------------
# The plots' data, without matplotlib


def test_heatmap_data_is_the_stored_per_expert_loads_and_flags_the_cell_over_the_gate():
    doc = load_balance_doc()
    data = P.load_heatmap(doc["runs"][0])
    stored = [layer["expert_tokens"] for layer in doc["runs"][0]["details"]["layers"]]
    assert data.loads_LE.tolist() == stored
    assert data.ranks_LW.tolist() == [[19, 21], [9, 31]]
    assert data.expert_gate == 1.5 and data.rank_gate is None and data.cv_gate["limit"] == 0.2
    # layer 1's mean is 10: only expert 3 (25) exceeds 1.5 × 10; layer 0's max 12 is under 1.5 × 10
    assert np.argwhere(P.over_gate(data.loads_LE, 1.5)).tolist() == [[1, 3]]
    assert not P.over_gate(data.loads_LE, None).any()


@pytest.mark.parametrize("n", [37, 100, 1000])
def test_cdf_marks_are_numpys_percentiles_of_the_samples_and_the_tables_values(n):
    samples = _samples(0.02, n, n)
    cdf = P.step_cdf(samples)
    x = np.sort(samples)
    assert cdf.marks[50] == np.percentile(samples, 50)
    for q in (90, 99):  # nearest rank: sorted[floor(n·q/100)], which numpy's "higher" method equals here
        assert cdf.marks[q] == np.percentile(samples, q, method="higher") == x[min(n * q // 100, n - 1)]
    stored = metric(samples, "s", "lower")
    assert (cdf.marks[50], cdf.marks[90], cdf.marks[99]) == (stored["median"], stored["p90"], stored["p99"])
    assert cdf.x.tolist() == x.tolist() and cdf.y[0] == 1 / n and cdf.y[-1] == 1.0


def test_sweep_series_follow_the_swept_value_per_other_params():
    runs = sweep_doc()["runs"]
    assert P.swept_key(runs) == "tokens_per_rank"  # both vary; tokens_per_rank takes more values
    assert P.swept_key([r for r in runs if r["params"]["tokens_per_rank"] == 16]) == "world_size"
    tokens = P.series(runs, "tokens_per_rank", "tokens_per_s_per_gpu")
    assert tokens == {
        "world_size=1": ([16, 256, 4096], [1600.0, 25600.0, 409600.0]),
        "world_size=2": ([16, 256, 4096], [800.0, 12800.0, 204800.0]),
    }
    busbw = P.series(runs, "tokens_per_rank", "a2a_busbw_gbps")
    assert busbw == {"world_size=2": ([16, 256, 4096], [0.016, 0.256, 4.096])}  # one rank has no busbw
    assert P.wide([16, 4096]) and not P.wide([1, 2, 4, 8]) and not P.wide([0, 100])


def test_overlap_bars_come_from_the_same_rounds():
    runs = overlap_doc()["runs"]
    labels, bars = P.overlap_bars(runs)
    assert labels == ["overlap_chunks=1", "overlap_chunks=4"]
    for i, run in enumerate(runs):
        m = run["metrics"]
        overlapped = np.median(np.array(m["compute_only_time_s"]["samples"]) + m["exposed_comm_s"]["samples"])
        assert bars["overlapped"][i] == pytest.approx(overlapped, rel=1e-12)
        assert bars["serial"][i] == np.median(m["serial_step_time_s"]["samples"])
        assert bars["exposed"][i] == np.median(m["exposed_comm_s"]["samples"])


def test_hit_rate_series_is_per_policy_against_cache_slots():
    hits = P.hit_rate_series(offload_doc()["runs"])
    assert hits == {
        "policy=lru": ([1, 2, 8], [0.125, 0.25, 1.0]),
        "policy=belady": ([1, 2, 8], [0.125 * 1.1, 0.25 * 1.1, 1.1]),
    }
    one_size = [r for r in offload_doc()["runs"] if r["params"]["cache_slots"] == 2]
    assert P.hit_rate_series(one_size) == {}  # nothing to draw against


def test_each_result_file_gets_the_plots_its_data_calls_for():
    got = {doc["scenario"]["scenario"]["name"]: [p.name for p in P.plots_for(doc)] for doc in (f() for f in ALL_DOCS)}
    assert got == {
        "lb": ["lb.expert-load"],
        "lat": ["lat.step-cdf"],  # swept over world_size, but latency has neither tokens/s nor busbw
        "sweep": ["sweep.sweep-tokens_per_rank"],
        "ovl": ["ovl.overlap"],
        "off": ["off.hit-rate"],
    }


# -------------------------------------------------------------------------------------------
# CSV


def test_csv_has_one_row_per_run_and_metric_equal_to_the_json(tmp_path, capsys):
    docs = [latency_doc(), offload_doc()]
    broken = run_record({}, {"world_size": 4}, status="error", world=4)
    docs[0]["runs"].append(broken)
    docs[1]["runs"][0]["metrics"]["cache_hit_rate"]["p99"] = None  # a statistic written as null
    folder = write_docs(tmp_path / "res", docs)
    assert main(["report", str(folder), "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["scenario", "params", "metric", "unit", "median", "p90", "p99", "n"]
    expected = []
    for path in sorted(folder.glob("*.json")):  # report reads files in sorted order
        doc = json.loads(path.read_text())
        for run in doc["runs"]:
            for name, m in run["metrics"].items():
                stats = [m["median"], m["p90"], m["p99"], m["n"]]
                expected.append((doc["scenario"]["scenario"]["name"], run["params"], name, m["unit"], stats))
    got = [
        (s, json.loads(p), name, unit, [None if v == "" else float(v) for v in stats])
        for s, p, name, unit, *stats in rows[1:]
    ]
    assert got == expected and len(got) == 2 + 6  # the errored run has no metrics, so no rows


# -------------------------------------------------------------------------------------------
# Bad input


def test_an_unknown_format_is_an_argparse_error_listing_the_accepted_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "results", "--format", "xml"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "invalid choice: 'xml'" in err and "'plain', 'markdown', 'csv'" in err


def test_without_matplotlib_html_and_plots_are_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    folder = write_docs(tmp_path / "res", [latency_doc()])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    for flag, target in (("--html", tmp_path / "page.html"), ("--plots", tmp_path / "pngs")):
        assert main(["report", str(folder), flag, str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"moebench: error: {flag} needs matplotlib, which is not installed: pip install 'moebench[plots]'"
        assert not target.exists()


# -------------------------------------------------------------------------------------------
# Drawing (needs matplotlib)


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (which must come first)."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_the_drawn_heatmap_shows_the_stored_loads_and_the_gate_line():
    pytest.importorskip("matplotlib")
    data = P.load_heatmap(load_balance_doc()["runs"][0])
    fig = P.draw_load_heatmap(data, "t")
    experts, ranks = fig.axes[0], fig.axes[1]  # then the two colour bars
    assert np.asarray(experts.images[0].get_array()).tolist() == data.loads_LE.tolist()
    assert np.asarray(ranks.images[0].get_array()).tolist() == data.ranks_LW.tolist()
    boxes = [(p.get_x() + 0.5, p.get_y() + 0.5) for p in experts.patches]
    assert boxes == [(3, 1)]  # expert 3 of layer 1
    bar = fig.axes[2]
    lines = sorted(line.get_ydata()[0] for line in bar.lines)
    assert lines == [data.loads_LE.mean(), 1.5 * data.loads_LE.mean()]  # the mean and the gate


def test_the_drawn_cdf_marks_each_runs_percentiles_in_ms():
    pytest.importorskip("matplotlib")
    doc = latency_doc()
    cdfs = {P.run_label(r["params"]): P.step_cdf(r["metrics"]["step_time_s"]["samples"]) for r in doc["runs"]}
    ax = P.draw_cdfs(cdfs, "t").axes[0]
    marked = sorted(
        (float(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in ax.lines if line.get_marker() in "os^"
    )
    expected = []
    for run in doc["runs"]:
        samples = run["metrics"]["step_time_s"]["samples"]
        for q, method in ((50, "linear"), (90, "higher"), (99, "higher")):
            expected.append((np.percentile(samples, q, method=method) * 1e3, q / 100))
    # flat (x, y, x, y, ...): pytest.approx compares flat sequences only (nested ones are a TypeError since 9.2)
    assert [v for point in marked for v in point] == pytest.approx([v for p in sorted(expected) for v in p], rel=1e-12)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0].startswith("world_size=1 (n=37)") and legend[1].startswith("world_size=2 (n=100)")


def test_a_sweep_over_more_than_10x_is_drawn_on_log_axes():
    pytest.importorskip("matplotlib")
    runs = sweep_doc()["runs"]
    panels = [("tokens/s per rank", "t", P.series(runs, "tokens_per_rank", "tokens_per_s_per_gpu"))]
    ax = P.draw_series(panels, "tokens per rank", "t").axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    narrow = [("hit rate", "t", {"policy=lru": ([1, 2, 8], [0.1, 0.2, 0.9])})]
    ax = P.draw_series(narrow, "cache slots", "t").axes[0]
    assert ax.get_xscale() == "linear" and ax.get_yscale() == "linear"


def test_the_page_has_one_decodable_png_per_plot_and_the_plots_folder_the_same(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    PIL = pytest.importorskip("PIL.Image")
    docs = [f() for f in ALL_DOCS]
    docs[1]["scenario"]["scenario"]["description"] = "<script>alert(1)</script> & co"
    folder = write_docs(tmp_path / "res", docs)
    page, pngs = tmp_path / "page.html", tmp_path / "pngs"
    assert main(["report", str(folder), "--html", str(page), "--plots", str(pngs)]) == 0
    text = page.read_text()
    expected = [p.name for path in sorted(folder.glob("*.json")) for p in P.plots_for(json.loads(path.read_text()))]
    images = re.findall(r'<figure id="([^"]+)"><img alt="[^"]*" src="data:image/png;base64,([^"]+)">', text)
    assert [name for name, _ in images] == expected and text.count("<img ") == len(expected) == 5
    for name, b64 in images:
        data = base64.b64decode(b64, validate=True)
        width, height = _png_size(data)
        assert width > 0 and height > 0
        assert PIL.open(io.BytesIO(data)).size == (width, height)
        assert (pngs / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.stem for p in pngs.iterdir()) == sorted(expected)
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in text and "<script>" not in text
    assert "http://" not in text and "https://" not in text  # nothing fetched from the network
    assert str(tmp_path) not in text  # files named within their folder, never by this machine's path
    # the header: the environment and the warnings (lb missed its imbalance gate)
    assert "2.13.0" in text and "abc" in text
    assert "SLO max_imbalance missed (imbalance_max_mean = 2.5, limit 1.5)" in text


def test_the_page_names_result_files_within_their_shared_folder_not_by_machine_path():
    from moebench.report.page import shown_paths

    one_folder = [Path("/tmp/ds/faults.json"), Path("/tmp/ds/offload.json")]
    assert shown_paths(one_folder) == ["faults.json", "offload.json"]
    two_folders = [Path("/data/mon/x.json"), Path("/data/tue/x.json"), Path("/data/tue/deep/y.json")]
    assert shown_paths(two_folders) == ["mon/x.json", "tue/x.json", "tue/deep/y.json"]
    assert shown_paths([Path("/tmp/ds/only.json")]) == ["only.json"]
    assert shown_paths([]) == []


def test_html_to_a_folder_that_does_not_exist_is_one_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    folder = write_docs(tmp_path / "res", [latency_doc()])
    for target, message in ((tmp_path / "no" / "page.html", "cannot write: no folder"), (tmp_path, "cannot write")):
        assert main(["report", str(folder), "--html", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(
            f"moebench: error: --html {target}" if "no folder" in message else f"moebench: error: {target}"
        )
        assert message in err and len(err.splitlines()) == 1


# -------------------------------------------------------------------------------------------
# A real browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_a_headless_chromium_decodes_every_image_of_the_page(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium or chromium-browser on PATH (Debian: apt install chromium)")
    docs = [f() for f in ALL_DOCS]
    for doc in docs:  # a long environment value, as real hosts have: the environment table must wrap it
        doc["environment"]["cpu"] = "Intel(R) Xeon(R) Platinum " * 12
    folder = write_docs(tmp_path / "res", docs)
    page = tmp_path / "page.html"
    assert main(["report", str(folder), "--html", str(page)]) == 0
    probe = (  # after load: each image's decoded width and the layout's widths, into the DOM for --dump-dom
        "<script>window.addEventListener('load', () => { const b = document.body, env = document.querySelector('.env');"
        "b.setAttribute('data-widths', "
        "Array.from(document.images).map(i => i.complete ? i.naturalWidth : -1).join(','));"
        "b.setAttribute('data-page', [document.documentElement.scrollWidth, window.innerWidth].join(','));"
        "b.setAttribute('data-env', [env.scrollWidth, env.clientWidth].join(',')); });</script>"
    )
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", probe + "</body>"))
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom"]
    # a 640 px window: every result table here is wider than the page, so each must scroll in its box
    done = subprocess.run([*cmd, "--window-size=640,900", probed.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'data-widths="([^"]*)"', done.stdout)
    assert found, done.stderr[-2000:]
    widths = [int(w) for w in found.group(1).split(",")]
    assert len(widths) == page.read_text().count("<img ") == 5 and all(w > 0 for w in widths)
    page_w, window_w = map(int, re.search(r'data-page="([^"]*)"', done.stdout).group(1).split(","))
    assert page_w <= window_w  # the page itself never scrolls sideways: wide tables scroll in their own box
    env_scroll, env_client = map(int, re.search(r'data-env="([^"]*)"', done.stdout).group(1).split(","))
    assert env_scroll <= env_client  # the environment table wraps its long values instead of scrolling


def test_a_hand_edited_load_table_is_one_line_naming_the_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    doc = load_balance_doc()
    doc["runs"][0]["details"]["layers"][1]["expert_tokens"] = [1, 2]  # 2 experts where layer 0 has 4
    folder = write_docs(tmp_path / "res", [doc])
    assert main(["report", str(folder), "--plots", str(tmp_path / "pngs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moebench: error: {folder / 'lb.json'}: malformed result file: ValueError")
    assert len(err.splitlines()) == 1 and not (tmp_path / "pngs").exists()  # the folder it made is removed


# -------------------------------------------------------------------------------------------
# The summary at the top of the page, and plots with many series


class _SummaryParser(HTMLParser):
    """The summary table's rows (cell texts, and the first cell's link) and every element id on the page."""

    def __init__(self):
        super().__init__()
        self.rows, self.ids, self.links = [], set(), []
        self._in_summary, self._cell = False, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "table" and attrs.get("id") == "summary":
            self._in_summary = True
        elif self._in_summary and tag == "tr":
            self.rows.append([])
        elif self._in_summary and tag == "td":
            self._cell = ""
        elif self._in_summary and tag == "a" and self._cell == "":
            self.links.append(attrs["href"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_summary = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1].append(self._cell)
            self._cell = None


def _failing_equivalence_doc(name: str) -> dict:
    checks = [{"name": "rel_error_within_tolerance", "pass": False, "detail": "out 3e-2"}]
    runs = [
        run_record({"rel_error_forward": metric([2e-7], "ratio", "lower", exact=True)}, {"overlap_chunks": 1}),
        run_record(
            {"rel_error_forward": metric([3e-2], "ratio", "lower", exact=True)}, {"overlap_chunks": 4}, checks=checks
        ),
    ]
    return result_doc(runs, name=name, kind="equivalence")


def test_the_summary_has_one_row_per_result_file_with_its_verdict_failures_headline_and_link():
    errored = result_doc([run_record({}, status="error")], name="broken")
    docs = [load_balance_doc(), latency_doc(), _failing_equivalence_doc("eq"), _failing_equivalence_doc("eq"), errored]
    html_page = page_module.page(docs, [Path(f"r{i}.json") for i in range(len(docs))], [[] for _ in docs])
    parsed = _SummaryParser()
    parsed.feed(html_page)
    rows = [r for r in parsed.rows if r]  # the header row has th cells only
    assert html_page.index('id="summary"') < html_page.index("<h2>Environment</h2>")  # the page starts with it
    lat = latency_doc()["runs"]
    p50 = sorted(f"{run['metrics']['step_time_s']['median'] * 1e3:.3f}" for run in lat)  # latency's column 1
    assert rows == [
        ["lb", "load_balance", "1", "FAIL (1 of 1 runs)", "SLO max_imbalance", "imbalance (max/mean): -"],
        ["lat", "latency", "2", "ok", "-", f"p50 (ms): {p50[0]} – {p50[1]}"],
        [
            "eq",
            "equivalence",
            "2",
            "FAIL (1 of 2 runs)",
            "rel_error_within_tolerance",
            "fwd rel err: 2.0e-07 – 3.0e-02",
        ],
        [
            "eq",
            "equivalence",
            "2",
            "FAIL (1 of 2 runs)",
            "rel_error_within_tolerance",
            "fwd rel err: 2.0e-07 – 3.0e-02",
        ],
        ["broken", "throughput", "1", "error (1 of 1 runs)", "-", "tokens/s: -"],
    ]
    assert parsed.links == ["#lb", "#lat", "#eq", "#eq-2", "#broken"]  # two files of one name: two sections
    assert {link[1:] for link in parsed.links} <= parsed.ids


def test_the_headline_is_the_files_first_recorded_column_scaled_and_formatted():
    doc = latency_doc()
    doc["columns"] = [["step_time_s:p99", "p99 (ms)", 1e3, ".1f"], *doc["columns"]]
    p99 = [run["metrics"]["step_time_s"]["p99"] * 1e3 for run in doc["runs"]]
    assert page_module.headline(doc) == f"p99 (ms): {min(p99):.1f} – {max(p99):.1f}"
    doc["columns"] = []  # a file from before columns were recorded
    assert page_module.headline(doc) == "-"


def nine_series_offload_doc() -> dict:
    """cache_slots against 3 policies × 3 prefetch depths: nine hit-rate series."""
    runs = [
        run_record(
            {"cache_hit_rate": metric([slots / 8 / (1 + prefetch)], "ratio", "higher")},
            {"cache_slots": slots, "policy": policy, "prefetch": prefetch},
            world=1,
        )
        for slots in (1, 2, 8)
        for policy in ("lru", "lfu", "belady")
        for prefetch in (0, 1, 2)
    ]
    return result_doc(runs, name="off9")


def test_nine_hit_rate_series_split_into_one_panel_per_prefetch_coloured_by_policy():
    runs = nine_series_offload_doc()["runs"]
    named = P.series_params(runs, "cache_slots")
    assert len(P.hit_rate_series(runs)) == len(named) == 9
    layout = P.series_layout(list(named.values()))
    assert layout == P.SeriesLayout(colour="policy", style=None, facet=("prefetch",))  # 3 × 3 > 6 in one panel
    facets = {P.facet_label(layout, p) for p in named.values()}
    assert facets == {"prefetch=0", "prefetch=1", "prefetch=2"}


@pytest.mark.parametrize(
    "params, expected",
    [
        ([{"policy": p, "prefetch": f} for p in ("lru", "lfu", "belady") for f in (0, 1)], ("policy", "prefetch", ())),
        ([{"policy": p} for p in "abcdefghi"], ("policy", None, ())),  # one dimension: one panel, coloured
        ([{"policy": "lru", "world_size": 2}], (None, None, ())),  # nothing varies: no legend needed
        (
            [{"a": a, "b": b, "c": c} for a in range(3) for b in range(2) for c in range(2)],
            ("a", "b", ("c",)),  # 3 × 2 fit a panel; the third dimension is facets
        ),
    ],
    ids=["3x2-colour-and-style", "one-dimension", "none-varies", "three-dimensions"],
)
def test_series_layout_gives_each_varying_param_one_channel(params, expected):
    layout = P.series_layout(params)
    assert (layout.colour, layout.style, layout.facet) == expected


def test_nine_series_draw_as_three_panels_of_three_with_one_colour_per_policy():
    pytest.importorskip("matplotlib")
    runs = nine_series_offload_doc()["runs"]
    panel = [("hit rate", "hit rate", P.hit_rate_series(runs))]
    fig = P.draw_series(panel, "cache slots", "t", P.series_params(runs, "cache_slots"))
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["hit rate: prefetch=0", "hit rate: prefetch=1", "hit rate: prefetch=2"]
    colours = [[line.get_color() for line in ax.get_lines()] for ax in shown]
    assert all(c == colours[0] and len(set(c)) == 3 for c in colours)  # policy keeps its colour in every panel
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["policy=lru", "policy=lfu", "policy=belady"]
