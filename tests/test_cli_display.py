"""What ``comfy-pipeline run`` shows a person (issue 9, items 1 and 2).

The command runs as a real process against the stand-in ComfyUI and the session's Prefect test
API. On a terminal it runs under a pseudo-terminal (``pty``) and its output is replayed in a
terminal emulator (pyte), so the test reads the screen a person would see, not the escape codes.
Without a terminal its output is read from pipes, line by line.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pyte
import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from comfy_pipeline.flows.cli_display import Counts, Failure, Tally, one_line
from tests.conftest import EXAMPLES, ROOT

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.timeout(120)]

SMOKE = str(EXAMPLES / "smoke_image.json")
COLUMNS, ROWS = 120, 60
#: The line that ends a successful run's summary, and the one that names its report.
SUMMARY = re.compile(r"^\d+ of \d+ generation\(s\) done, \d+ file\(s\) in ")


def cli_env() -> dict:
    # DO_NOT_TRACK: no telemetry (there is no network here), and so no first-run telemetry notice
    # from Prefect, which it prints once per PREFECT_HOME on a terminal.
    return dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), TERM="xterm-256color",
                COLUMNS=str(COLUMNS), LINES=str(ROWS), DO_NOT_TRACK="1")


def run_in_pty(*args: str, timeout_s: float = 100) -> tuple[int, list[bytes]]:
    """``comfy-pipeline ARGS`` with stdin, stdout and stderr on a pseudo-terminal of
    :data:`COLUMNS` x :data:`ROWS`; returns its exit code and everything it wrote, in the chunks
    the terminal received."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "comfy_pipeline.flows.cli", *args], cwd=ROOT, env=cli_env(),
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout_s)
            if not ready:
                pytest.fail("the command wrote nothing for %s s:\n%s" % (timeout_s, b"".join(chunks)[-3000:]))
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process exited and closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        return proc.wait(timeout=timeout_s), chunks
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


class Terminal:
    """A terminal emulator fed the chunks one by one: :attr:`frames` holds the screen after each."""

    def __init__(self, chunks: list[bytes]):
        self.screen = pyte.Screen(COLUMNS, 400)  # tall: nothing scrolls off
        stream = pyte.ByteStream(self.screen)
        self.frames: list[list[str]] = []
        for chunk in chunks:
            stream.feed(chunk)
            self.frames.append(self.lines())

    def lines(self) -> list[str]:
        """The screen's lines with text, trailing spaces dropped."""
        return [line.rstrip() for line in self.screen.display if line.strip()]


def comfy_pipeline(*args: str) -> subprocess.CompletedProcess:
    """``comfy-pipeline ARGS`` with its output on pipes (no terminal)."""
    completed = subprocess.run([sys.executable, "-m", "comfy_pipeline.flows.cli", *args], capture_output=True,
                               text=True, timeout=180, env=cli_env(), cwd=ROOT)
    completed.output = completed.stdout + completed.stderr
    return completed


def descriptions(n: int) -> list[str]:
    return [arg for i in range(n) for arg in ("--description", f"a lantern number {i + 1}")]


@pytest.fixture(scope="module")
def hundred_on_a_terminal(tmp_path_factory):
    """One run of 100 generations (20 descriptions x 5 variants) on a terminal, default verbosity."""
    from tests.standin import StandInComfyUI

    out = tmp_path_factory.mktemp("pty-out")
    with StandInComfyUI() as comfy:
        code, chunks = run_in_pty("run", "--server", comfy.url, "--workflow", SMOKE, *descriptions(20),
                                  "--variants", "5", "--character", "lamp", "--output-dir", str(out))
    return code, Terminal(chunks), out


def counts_shown(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines for m in [re.search(r"(\d+)/100 done · ", line)] if m]


def test_on_a_terminal_the_live_display_counts_up_to_the_total(hundred_on_a_terminal):
    code, terminal, out = hundred_on_a_terminal
    final = terminal.lines()
    assert code == 0, "\n".join(final)
    # the display was drawn before any generation was done, and its last state shows all 100 done
    seen = [counts for counts in (counts_shown(frame) for frame in terminal.frames) if counts]
    assert seen and seen[0][0] < 100, "\n".join(final)
    display = [line for line in final if "/100 done · " in line]
    assert len(display) == 1, "\n".join(final)  # drawn in place: one line on the screen, not one per update
    assert "100/100 done · 0 failed · 0 running · 0 queued" in display[0], display
    assert any("generations/min" in line and "127.0.0.1:" in line for line in final), "\n".join(final)
    assert len(list(out.rglob("*.png"))) == 100


def test_default_verbosity_prints_under_5_lines_per_100_generations_besides_the_summary(hundred_on_a_terminal):
    code, terminal, out = hundred_on_a_terminal
    final = terminal.lines()
    summary_at = next(i for i, line in enumerate(final) if SUMMARY.match(line))
    summary = " ".join(final[summary_at:])  # as shown: a long line wraps
    assert summary.startswith(f"100 of 100 generation(s) done, 100 file(s) in {out}"), final
    assert "report: prefect artifact inspect lamp-image-summary" in summary, final
    assert ".png" not in summary  # no file list without -v or --list-files
    before = final[:summary_at]
    assert len(before) < 5, "\n".join(final)
    assert "Traceback" not in "\n".join(final)


def test_without_a_terminal_each_finished_generation_is_one_line(comfy, tmp_path):
    result = comfy_pipeline("run", "--server", comfy.url, "--workflow", SMOKE, *descriptions(3), "--variants", "2",
                            "--output-dir", str(tmp_path / "out"), "--list-files")
    assert result.returncode == 0, result.output
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", result.output), repr(result.output[-2000:])  # no \x1b, no \r
    finished = [line for line in result.stderr.splitlines() if re.match(r"^\[\d/6 done\] ", line)]
    assert [line[:10] for line in finished] == [f"[{n}/6 done]" for n in range(1, 7)], result.stderr
    pairs = sorted(re.search(r"description (\d)/3, variant (\d)/2", line).groups() for line in finished)
    assert pairs == [(str(d), str(v)) for d in (1, 2, 3) for v in (1, 2)]
    others = [line for line in result.stderr.splitlines() if line not in finished]
    assert len(others) == 1 and others[0].startswith("flow run '"), result.stderr  # and nothing else
    summary = result.stdout.splitlines()
    assert summary[0].startswith(f"6 of 6 generation(s) done, 6 file(s) in {tmp_path / 'out'}"), result.stdout
    listed = sorted(Path(line.strip()).name for line in summary[1:7])
    assert listed == sorted(p.name for p in (tmp_path / "out").rglob("*.png")) and len(listed) == 6, result.stdout
    assert summary[7].startswith("report: prefect artifact inspect character-image-summary"), result.stdout


def test_the_tally_counts_a_generation_once_even_when_it_failed_before():
    tally = Tally(total=3)
    first = {"position": 1, "index": 0, "variant": 0, "description": "a fox"}
    tally.apply({**first, "event": "started"})
    tally.apply({**first, "event": "failed", "error": "NodeExecutionError: boom"})
    assert tally.counts() == Counts(done=0, failed=1, running=0, queued=2, total=3)
    assert tally.failures() == [Failure("a fox", 0, "NodeExecutionError: boom")]
    tally.apply({**first, "event": "started"})  # a retried flow run ran it again
    assert tally.counts() == Counts(done=0, failed=1, running=1, queued=1, total=3)
    assert tally.apply({**first, "event": "done", "files": ["/out/a.png"], "total_s": 1.0})
    assert tally.counts() == Counts(done=1, failed=0, running=0, queued=2, total=3)
    assert tally.files() == ["/out/a.png"] and tally.failures() == []


def test_an_error_in_the_table_is_one_short_line():
    error = ("NodeExecutionError: ComfyUI node 6 (CLIPTextEncode) failed in prompt "
             "54dbf383-fcb3-5420-8900-680d9fc92126:\n  RuntimeError: stand-in failure requested")
    assert one_line(error, 200) == ("NodeExecutionError: ComfyUI node 6 (CLIPTextEncode) failed in prompt 54dbf383…: "
                                    "RuntimeError: stand-in failure requested")
    assert len(one_line(error * 10)) == 120 and one_line(error * 10).endswith("…")


def flow_runs() -> int:
    with get_client(sync_client=True) as client:
        return client.count_flow_runs()


#: Bad arguments (the issue's), and what the one line that refuses each of them says.
BAD_ARGUMENTS = {
    "seed below -1": (["--seed", "-2"], "'--seed': -2 is not a seed"),
    "seed past 2^64-1": (["--seed", "18446744073709551616"], "'--seed': 18446744073709551616 is not a seed"),
    "no variants": (["--variants", "0"], "'--variants'"),
    "missing workflow": (["--workflow", "no-such-workflow.json"], "'no-such-workflow.json' does not exist"),
}
#: More, checked through the same entry point in this process (no interpreter start-up each).
MORE_BAD_ARGUMENTS = {
    "increment past 2^64-1": (["--seed-mode", "increment", "--seed", "18446744073709551615"],
                              "past ComfyUI's largest"),
    "unknown kind": (["--kind", "gif"], "'gif' is not one of 'image', 'video'"),
    "a file as output folder": (["--output-dir", "README.md/out"], "is a file, not a folder"),
    "unknown option": (["--sead", "1"], "No such option: --sead"),
}
RUN = ["run", "--server", "http://127.0.0.1:9", "--workflow", SMOKE, "--description", "a fox", "--description", "a bird"]


@pytest.fixture(scope="module")
def refused():
    """Each of :data:`BAD_ARGUMENTS` given to a real ``comfy-pipeline run`` process (all at once,
    to keep it quick): ``{name: (output, exit code)}``, and the flow runs in the API before and after."""
    before = flow_runs()
    started = {name: subprocess.Popen([sys.executable, "-m", "comfy_pipeline.flows.cli", *RUN, *args], cwd=ROOT,
                                      env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for name, (args, _) in BAD_ARGUMENTS.items()}
    results = {name: (proc.communicate(timeout=60)[0], proc.returncode) for name, proc in started.items()}
    return results, before, flow_runs()


def assert_refused(output: str, code: int, says: str) -> None:
    assert code == 2, output
    lines = output.splitlines()
    assert len(lines) == 1 and says in lines[0], output
    assert "report" not in output and "Traceback" not in output


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_a_bad_argument_exits_2_with_one_line_and_no_flow_run(refused, name):
    results, runs_before, runs_after = refused
    output, code = results[name]
    assert_refused(output, code, BAD_ARGUMENTS[name][1])
    assert runs_after == runs_before


@pytest.mark.parametrize("name", list(MORE_BAD_ARGUMENTS))
def test_more_bad_arguments_exit_2_with_one_line_and_no_flow_run(name, capfd, monkeypatch):
    from comfy_pipeline.flows.cli import main

    monkeypatch.chdir(ROOT)
    before = flow_runs()
    args, says = MORE_BAD_ARGUMENTS[name]
    with pytest.raises(SystemExit) as exit_:
        main([*RUN, *args])
    captured = capfd.readouterr()
    assert_refused(captured.out + captured.err, exit_.value.code, says)
    assert flow_runs() == before


def test_help_lists_the_kinds_and_says_what_seed_minus_one_means():
    result = comfy_pipeline("run", "--help")
    assert result.returncode == 0
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stdout).split())
    assert "image|video" in text
    assert "-1 means random" in text


def test_the_count_goes_on_across_the_shards_of_a_sharded_run():
    """Each shard's positions start again at 1; the display counts generations, not positions."""
    from comfy_pipeline.flows.cli_display import Tally

    tally = Tally(total=6)
    for shard_start in (0, 2, 4):  # three shards of two descriptions, positions 1 and 2 in each
        for number in range(2):
            tally.apply({"event": "done", "position": number + 1, "index": shard_start + number, "variant": 0,
                         "label": "variant 1/1", "description": "d", "files": [], "total_s": 0.1})
    assert tally.counts().done == 6
    # an image and a video of the same description and number are two generations
    both = Tally(total=2)
    for label in ("image 1/1", "video 1/2"):
        both.apply({"event": "done", "position": 1, "index": 0, "variant": 0, "label": label, "description": "d",
                    "files": [], "total_s": 0.1})
    assert both.counts().done == 2
