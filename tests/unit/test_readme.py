"""README.md stands alone and says what the repository shows: every path it links to is in the
repository, and its performance table is bench/RESULTS.md's summary of the run in
bench/results.json (bench/report.py writes both; `make bench` keeps them in step)."""

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
sys.path.insert(0, str(REPO / "bench"))

import report  # noqa: E402

# [text](target) links; the target without an anchor.
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_relative_links_resolve_inside_the_repository():
    text = README.read_text()
    targets = [t for t in LINK.findall(text) if "://" not in t and not t.startswith("mailto:")]
    assert "docs/design.md" in targets
    for target in targets:
        path = (REPO / target).resolve()
        assert REPO in path.parents, f"README links outside the repository: {target}"
        assert path.exists(), f"README links to {target}, which is not in the repository"


def test_names_no_path_above_the_repository():
    text = README.read_text()
    assert "../" not in text, [line for line in text.splitlines() if "../" in line]


def test_performance_table_is_the_summary_of_the_bench_run():
    res = json.loads((REPO / "bench" / "results.json").read_text())
    text = README.read_text()
    assert report.with_summary(text, res) == text, \
        "README's performance table differs from bench/results.json: run `.venv/bin/python bench/report.py`"
    assert report.summary(res) in (REPO / "bench" / "RESULTS.md").read_text()


def _rounds(**figures: list[float]) -> dict[str, list[dict]]:
    """{forwarder: rounds} from keyword args like ours_builtin=[tcp_up, p99]."""
    return {name.replace("_", "-"): [{"tcp_up_gbps": up, "newconn_p99_ms": p99}]
            for name, (up, p99) in figures.items()}


def test_best_peer_is_the_best_of_the_peers_only():
    rounds = _rounds(ours_builtin=[10, 5], pasta=[12, 9], socat=[8, 4], slirp4netns=[11, 6],
                     loopback=[30, 1], ours_pasta=[40, 0.5])
    assert report.best_peer(rounds, "tcp_up_gbps") == ("pasta", 12)     # higher is better
    assert report.best_peer(rounds, "newconn_p99_ms") == ("socat", 4)   # lower is better
    assert report.best_peer({"ours-builtin": rounds["ours-builtin"]}, "tcp_up_gbps") is None


@pytest.mark.parametrize("ours, peer, higher, expected", [
    (10, 12, True, "0.83× behind"),
    (10, 9, True, "1.11× even"),
    (10, 8, True, "1.25× ahead"),
    (9, 11.43, False, "0.79× ahead"),
    (17, 1.4, False, "12.14× behind"),
])
def test_verdict(ours, peer, higher, expected):
    assert report.verdict(ours, peer, higher) == expected


def test_a_partial_run_leaves_the_readme_alone(tmp_path):
    readme = tmp_path / "README.md"
    original = f"x\n{report.SUMMARY_BEGIN}\nold\n{report.SUMMARY_END}\ny\n"
    readme.write_text(original)
    res = {"rounds": _rounds(ours_builtin=[10, 5], pasta=[12, 9])}
    assert "left alone" in report.update_readme(res, readme)
    assert readme.read_text() == original


def test_a_full_run_rewrites_only_the_summary(tmp_path):
    from forwarders import FORWARDERS

    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{report.SUMMARY_BEGIN}\nOLD TABLE\n{report.SUMMARY_END}\nafter\n")
    res = {"rounds": {name: [{"tcp_up_gbps": 10.0 + i}] for i, name in enumerate(FORWARDERS)}}
    assert "wrote" in report.update_readme(res, readme)
    text = readme.read_text()
    assert text.startswith(f"before\n{report.SUMMARY_BEGIN}\n") and text.endswith(f"{report.SUMMARY_END}\nafter\n")
    assert "OLD TABLE" not in text
    assert "| TCP host→container, Gbit/s | 10.00 | 15.00 (socat) | 0.67× behind, 0/1 rounds | 16.00 |" in text


def test_the_rootless_row_is_summed_up_against_the_best_peer_and_rootlesskit():
    rounds = {"ours-builtin": [{"tcp_up_gbps": 10.0, "service_sees_client": True}],
              "ours-rootless": [{"tcp_up_gbps": 9.0, "service_sees_client": True}],
              "rootlesskit-builtin": [{"tcp_up_gbps": 6.0}], "pasta": [{"tcp_up_gbps": 12.0}]}
    text = report.summary({"rounds": rounds})
    assert "| ours (builtin) |" in text and "rootful" in text
    assert "| TCP host→container, Gbit/s | 9.00 | 10.00 | 12.00 (pasta) | 0.75× behind, 0/1 rounds | 6.00 | 1.50× ahead, 1/1 rounds |" in text
    assert "did not see" not in text
    del rounds["ours-rootless"]
    assert "ours rootless" not in report.summary({"rounds": rounds}).lower()


def test_the_summary_says_when_the_service_did_not_see_the_client():
    rounds = {"ours-builtin": [{"tcp_up_gbps": 10.0, "service_sees_client": True}],
              "ours-rootless": [{"tcp_up_gbps": 9.0, "service_sees_client": False},
                                {"tcp_up_gbps": 9.0, "service_sees_client": True}]}
    text = " ".join(report.summary({"rounds": rounds}).split())
    assert "Ours rootless: the service did not see the client's own address and port in 1 of 2 rounds" in text


def test_rounds_are_compared_round_by_round():
    """k/n counts the rounds in which ours did at least as well as the other in the same round
    (times `factor`; at most, where lower is better), over the rounds that gave both figures."""
    ours = [{"tcp_up_gbps": 10.0, "newconn_p99_ms": 5.0}, {"tcp_up_gbps": 8.0, "newconn_p99_ms": 9.0},
            {"tcp_up_gbps": 12.0}, {"tcp_up_gbps": None}]
    peer = [{"tcp_up_gbps": 9.0, "newconn_p99_ms": 6.0}, {"tcp_up_gbps": 9.0, "newconn_p99_ms": 8.0},
            {"tcp_up_gbps": 12.0, "newconn_p99_ms": 1.0}, {"tcp_up_gbps": 1.0}]
    assert report.rounds_met(ours, peer, "tcp_up_gbps") == (2, 3)
    assert report.rounds_met(ours, peer, "tcp_up_gbps", factor=1.2) == (0, 3)
    assert report.rounds_met(ours, peer, "newconn_p99_ms") == (1, 2)
    assert report.rounds_won(ours, peer, "tcp_up_gbps") == ", 2/3 rounds"
    assert report.rounds_won(ours, peer, "udp_mbps") == ""


def test_a_re_render_keeps_the_container_cost_section_and_a_copy_leaves_the_readme_alone(tmp_path, capsys):
    res = json.loads((REPO / "bench" / "results.json").read_text())
    (tmp_path / "results.json").write_text(json.dumps(res))
    section = "<!-- container-cost: bench/container_cost.py -->\n## What each container pays\n\n| x |\n<!-- /container-cost -->\n"
    (tmp_path / "RESULTS.md").write_text("# old render\n\n" + section)
    readme_before = README.read_text()
    assert report.main([str(tmp_path / "results.json")]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "# old render" not in text and report.summary(res) in text
    assert text.endswith("\n\n" + section)
    assert README.read_text() == readme_before
    assert "summary" not in capsys.readouterr().out
