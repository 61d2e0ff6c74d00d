"""`zmqdist up --check`: topology files are checked whole, and errors name the line and the field."""

import textwrap

import pytest
from click.testing import CliRunner

from tests.integration.helpers import ROOT
from zmqdist import topology
from zmqdist.cli import main
from zmqdist.errors import ConfigError

GEO = ROOT / "examples" / "geo" / "topology.toml"

GOOD = """\
[[broker]]
name = "master"
bind = ["tcp://127.0.0.1:7400"]

[[broker]]
name = "proxy"
bind = ["tcp://127.0.0.1:7401"]
upstream = ["tcp://127.0.0.1:7400"]
max-queue = 500

[[worker]]
name = "w"
target = "mod:obj"
connect = ["tcp://127.0.0.1:7401"]
count = 3
"""


def check(tmp_path, text, *extra):
    f = tmp_path / "t.toml"
    f.write_text(textwrap.dedent(text))
    return CliRunner().invoke(main, ["up", "--check", *extra, str(f)])


def test_the_geo_example_is_valid_and_starts_roots_first():
    r = CliRunner().invoke(main, ["up", "--check", str(GEO)])
    assert r.exit_code == 0, r.output
    assert "6 brokers, 4 workers, 2 loads" in r.output
    topo = topology.load(GEO)
    order = {p.name: p.order for p in topo.processes}
    assert order["master-a"] == order["master-b"] == 0 and order["east-a"] == order["west-b"] == 1


def test_a_good_file_gives_each_process_its_command_line(tmp_path):
    r = check(tmp_path, GOOD)
    assert r.exit_code == 0, r.output
    assert "zmqdist broker --bind tcp://127.0.0.1:7401 --name proxy --upstream tcp://127.0.0.1:7400" in r.output
    assert "--max-queue 500" in r.output
    assert [line.split()[0] for line in r.stdout.splitlines()[1:]] == ["master", "proxy", "w-1", "w-2", "w-3"]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (GOOD.replace("[[worker]]", "[[workers]]"), 11, ["unknown table [workers]", "did you mean 'worker'"]),
        (GOOD.replace("max-queue = 500", "max-queue = -5"), 9, ["broker 'proxy'", "max_queue must be at least 1"]),
        (GOOD.replace("max-queue = 500", "max-queu = 5"), 9, ["unknown broker option 'max_queu'", "max_queue"]),
        (
            GOOD.replace("count = 3", "concurrancy = 3"),
            15,
            ["unknown field 'concurrancy'", "did you mean 'concurrency'"],
        ),
        (GOOD.replace("count = 3", "count = 0"), 15, ["count must be from 1 to 1000"]),
        (GOOD.replace('target = "mod:obj"', 'target = "mod.obj"'), 13, ["target must be MODULE:OBJECT"]),
        (GOOD.replace('connect = ["tcp://127.0.0.1:7401"]', 'connect = ["tcp://127.0.0.1:99999"]'), 14, ["port"]),
        (GOOD.replace('connect = ["tcp://127.0.0.1:7401"]\n', ""), 11, ["connect is required"]),
        # a broker's own endpoints are checked as the broker checks them when it starts (--check
        # said "valid" to an upstream that was a bind address, and the proxy then exited at once)
        (
            GOOD.replace('upstream = ["tcp://127.0.0.1:7400"]', 'upstream = ["tcp://*:7400"]'),
            8,
            ["broker 'proxy': upstream: 'tcp://*:7400' is a bind address"],
        ),
        (GOOD.replace('bind = ["tcp://127.0.0.1:7401"]', 'bind = ["tcp://127.0.0.1:0"]'), 7, ["'proxy'", "port"]),
        (GOOD.replace('name = "w"', 'name = "proxy"'), 12, ["'proxy'", "names must be unique"]),
        (GOOD.replace('bind = ["tcp://127.0.0.1:7401"]', 'bind = ["tcp://127.0.0.1:7400"]'), 7, ["binds", "master"]),
        (GOOD.replace('name = "master"\n', ""), 1, ["name is required"]),
        (GOOD + "\n[settings]\nrestart = 'yes'\n", 18, ["restart must be true or false"]),
        (GOOD.replace("count = 3", "count = 3\nrestart = 1"), 16, ["restart must be true or false"]),
    ],
)
def test_a_bad_file_is_refused_with_the_line_and_the_field(tmp_path, text, line, words):
    r = check(tmp_path, text)
    assert r.exit_code != 0
    assert f"t.toml:{line}:" in r.output, r.output
    for w in words:
        assert w in r.output, r.output


def test_syntax_errors_and_empty_files_are_refused_clearly(tmp_path):
    r = check(tmp_path, GOOD.replace('name = "w"', "name = w"))
    assert r.exit_code != 0 and "not valid TOML" in r.output and "line 12" in r.output
    r = check(tmp_path, "[settings]\nrestart = true\n")
    assert r.exit_code != 0 and "nothing to start" in r.output


def test_only_starts_a_hosts_share_by_process_or_entry_name(tmp_path):
    r = check(tmp_path, GOOD, "--only", "proxy,w")
    assert r.exit_code == 0, r.output
    assert [line.split()[0] for line in r.stdout.splitlines()[1:]] == ["proxy", "w-1", "w-2", "w-3"]
    r = check(tmp_path, GOOD, "--only", "w-2")
    assert [line.split()[0] for line in r.stdout.splitlines()[1:]] == ["w-2"]
    r = check(tmp_path, GOOD, "--only", "proxi")
    assert r.exit_code != 0 and "no process 'proxi'" in r.output and "did you mean 'proxy'" in r.output


def test_a_connect_no_broker_of_the_file_binds_is_a_warning_not_an_error(tmp_path):
    r = check(tmp_path, GOOD.replace('connect = ["tcp://127.0.0.1:7401"]', 'connect = ["tcp://10.0.0.9:7401"]'))
    assert r.exit_code == 0
    assert "warning: worker 'w' connects to tcp://10.0.0.9:7401, which no broker of this file binds" in r.output


def test_a_worker_module_not_found_here_is_a_warning(tmp_path):
    r = check(tmp_path, GOOD)
    assert r.exit_code == 0
    assert "warning: worker 'w': module 'mod' is not found here (pythonpath?)" in r.stderr
    (tmp_path / "mod.py").write_text("obj = None\n")
    r = check(tmp_path, GOOD + '\n[settings]\npythonpath = ["."]\n')
    assert r.exit_code == 0 and "not found" not in r.stderr


def test_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "w.key_secret").write_text("x")
    text = GOOD.replace("count = 3", 'key = "keys/w.key_secret"\nserver-key = "keys/none.key"')
    r = check(tmp_path, text)
    assert r.exit_code != 0 and "server_key 'keys/none.key': no such file" in r.output
    with pytest.raises(ConfigError, match=r"t\.toml:16"):
        topology.load(tmp_path / "t.toml")
