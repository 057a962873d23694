"""`dynllava chat`: a conversation in the terminal, each turn the whole history; on an export the prefix cache
supplies the earlier prompt (the summary line says how much) and the answers are those of a plain engine run."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from dynllava.cli import app
from dynllava.runtime.engine import Engine
from dynllava.runtime.sampling import SamplingParams
from dynllava.runtime.sequence import Request

runner = CliRunner()
CACHED = re.compile(r"prompt tokens from the prefix cache (\d+)/(\d+)")


def _turns(output: str) -> list[tuple[str, str]]:
    """(answer, summary line) per turn: each answer is followed by its summary line."""
    lines = [line for line in output.splitlines() if line.strip()]
    summaries = [i for i, line in enumerate(lines) if "image tokens kept" in line or "generated tokens" in line]
    return [(lines[i - 1], lines[i]) for i in summaries]


def test_a_conversation_streams_answers_and_reuses_the_earlier_prompt(fast_export_dir, official_dir):
    image = official_dir / "example.png"
    result = runner.invoke(app, ["chat", str(fast_export_dir), "--image", str(image), "--max-new-tokens", "8"],
                           input="What is in the picture?\nTell me more.\n\n")
    assert result.exit_code == 0, result.output
    (first, first_summary), (second, second_summary) = _turns(result.stdout)
    assert CACHED.search(first_summary) is None  # nothing cached before the first turn
    cached, prompt = map(int, CACHED.search(second_summary).groups())
    # the same conversation on an engine without the cache
    engine = Engine.from_path(fast_export_dir)
    history = [{"role": "user", "content": "What is in the picture?"}]
    params = SamplingParams(max_new_tokens=8)
    want = [engine.generate(Request(prompt=None, messages=history, image=str(image), params=params),
                            progress=False)[0]]
    history += [{"role": "assistant", "content": want[0].text}, {"role": "user", "content": "Tell me more."}]
    want.append(engine.generate(Request(prompt=None, messages=history, image=str(image), params=params),
                                progress=False)[0])
    assert [first.strip(), second.strip()] == [w.text.strip() for w in want]
    assert cached == want[0].stats.prompt_tokens and prompt == want[1].stats.prompt_tokens


def test_reset_starts_over_and_errors_leave_the_session_running(fast_export_dir):
    result = runner.invoke(app, ["chat", str(fast_export_dir), "--max-new-tokens", "6"],
                           input="Tell me a story.\n/reset\nTell me a story.\n")
    assert result.exit_code == 0, result.output
    (first, _), (again, summary) = _turns(result.stdout)
    assert again == first  # the same first turn again: its whole prompt from the cache
    cached, prompt = map(int, CACHED.search(summary).groups())
    assert cached == prompt
    # a turn the model cannot take is one line, and the next one is still read
    result = runner.invoke(app, ["chat", str(fast_export_dir), "--max-new-tokens", "100000"],
                           input="Hi\nHello\n")
    assert result.exit_code == 0 and result.output.count("error:") == 2 and "Traceback" not in result.output


def test_a_missing_image_is_one_line_before_the_model_loads(fast_export_dir, tmp_path):
    result = runner.invoke(app, ["chat", str(fast_export_dir), "--image", str(tmp_path / "none.png")], input="Hi\n")
    assert result.exit_code == 1 and "Traceback" not in result.output and "none.png" in result.output


def test_image_command_starts_over_about_another_image(fast_export_dir, official_dir, tmp_path):
    from PIL import Image

    other = tmp_path / "other.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(other)
    script = f"What is this?\n/image {tmp_path / 'missing.png'}\n/image {other}\nWhat is this?\n"
    result = runner.invoke(app, ["chat", str(fast_export_dir), "--image", str(official_dir / "example.png"),
                                 "--max-new-tokens", "6"], input=script)
    assert result.exit_code == 0, result.output
    assert result.output.count("error:") == 1 and "missing.png" in result.output  # a bad path: one line, go on
    (_, first), (answer, second) = _turns(result.stdout)
    # the other image, a fresh conversation: nothing cached (another image), the answer a plain run gives
    assert CACHED.search(second) is None
    want = Engine.from_path(fast_export_dir).generate(Request(
        prompt="What is this?", image=str(other), params=SamplingParams(max_new_tokens=6)), progress=False)[0]
    assert answer.strip() == want.text.strip()  # the printed answer is stripped, as generate prints it
