"""Property-based tests of the whole CLI (issue 18): random recipes, `--set` overrides and command
lines for every subcommand, run against tiny models (tests/cli_fuzz.py), never raise, exit 0, 1 or 2
with one `error:` line on failure, and leave every file that was there byte-identical unless
--force was given. A few hundred examples here; benchmarks/fuzz_cli.py runs the same strategies
10,000 times and more."""

import pytest
from hypothesis import HealthCheck, given, settings

from cli_fuzz import SUBCOMMANDS, Strategies, Workspace

EXAMPLES = {"generate": 60, "shapes": 40, "train": 40, "tune-video": 30, "invert": 40, "edit": 40, "evaluate": 50}
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("fuzz") / "ws")


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_no_command_line_raises_exits_outside_0_1_2_or_changes_files_without_force(workspace, subcommand):
    strategies = Strategies(workspace, cheap=True)

    @settings(max_examples=EXAMPLES[subcommand], deadline=None, derandomize=True, database=None,
              suppress_health_check=HEALTH)
    @given(strategies.command_line(subcommand))
    def check(line):
        outcome = line.run(workspace)
        assert not outcome.problems(), outcome.describe()

    check()
