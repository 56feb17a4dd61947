"""One source of configuration: flag > K5SERVE_* environment > --config TOML file > the dataclasses' defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest
from conftest import API_KEY, RunningServer, own_data_dir, task
from k5serve.pipelines.config import EngineConfig
from k5serve.server import options as opt
from k5serve.server.cli import build_parser
from k5serve.server.config import ServerConfig
from test_cli import ENV, k5serve


def resolve(argv: list[str], environ: dict[str, str] | None = None, config: str | None = None, tmp_path=None):
    args = build_parser().parse_args(["serve", *argv])
    path = None
    if config is not None:
        path = tmp_path / "k5serve.toml"
        path.write_text(config)
    return opt.resolve(args.options, args, environ or {}, path)


def test_defaults_are_the_dataclasses_defaults():
    values = resolve([])
    config = opt.build(ServerConfig, opt.SERVE_OPTIONS, values)
    assert config == ServerConfig()
    assert opt.build(EngineConfig, opt.SERVE_OPTIONS, values) == EngineConfig()
    assert values["port"] == 8080 and values["host"] == "127.0.0.1" and values["log_level"] == "info"


def test_flag_beats_environment_beats_file(tmp_path):
    file = "image-ttl = 100\nmax_queue = 5\npoll-wait = 2\n"
    env = {"K5SERVE_IMAGE_TTL": "200", "K5SERVE_MAX_QUEUE": "6"}
    values = resolve(["--image-ttl", "300"], env, file, tmp_path)
    assert (values["image_ttl"], values["max_queue"], values["poll_wait"]) == (300, 6, 2.0)
    values = resolve([], env, file, tmp_path)
    assert (values["image_ttl"], values["max_queue"]) == (200, 6)
    values = resolve([], {}, file, tmp_path)
    assert (values["image_ttl"], values["max_queue"], values["shutdown_timeout"]) == (100, 5, 60.0)
    # A flag wins without its variable being read: Kubernetes sets K5SERVE_PORT=tcp://10.0.0.1:8080 for a
    # Service named k5serve. An empty variable counts as unset.
    values = resolve(["--port", "9000"], {"K5SERVE_PORT": "tcp://10.0.0.1:8080", "K5SERVE_LOG_FORMAT": ""})
    assert values["port"] == 9000 and values["log_format"] is None


def test_lists_switches_and_paths_from_every_source(tmp_path):
    values = resolve([], {"K5SERVE_API_KEYS": "a-key-0123456789,b-key-0123456789", "K5SERVE_ALLOW_PRIVATE_URLS": "yes",
                          "K5SERVE_LORA_DIR": str(tmp_path)})
    config = opt.build(ServerConfig, opt.SERVE_OPTIONS, values)
    assert config.api_keys == ("a-key-0123456789", "b-key-0123456789") and config.allow_private_urls is True
    assert values["lora_dir"] == tmp_path
    values = resolve(["--api-key", "flag-key-0123456789"], {"K5SERVE_API_KEYS": "env-key"},
                     'api-key = ["file-key"]\nallow-private-urls = true\nmodel-alias = "my-model"\n', tmp_path)
    assert values["api_key"] == ["flag-key-0123456789"] and values["allow_private_urls"] is True
    assert values["model_alias"] == ["my-model"]
    assert resolve([], {"K5SERVE_ALLOW_PRIVATE_URLS": "0"})["allow_private_urls"] is False


def test_checked_numbers_are_taken_as_toml_numbers(tmp_path):
    values = resolve([], {}, "task-lease = 7\nheader-timeout = 2.5\nmax-connections = 100\nmin-free-disk = 0\n",
                     tmp_path)
    assert (values["task_lease"], values["header_timeout"], values["max_connections"], values["min_free_disk"]) == (
        7.0, 2.5, 100, 0)
    with pytest.raises(opt.ConfigError, match="invalid value '0' for --max-connections: must be"):
        resolve([], {}, "max-connections = 0\n", tmp_path)


@pytest.mark.parametrize(("source", "env", "file", "message"), [
    ("file", {}, "imge-ttl = 5\n", "unknown option 'imge-ttl'"),
    ("file", {}, "image-ttl = 'soon'\n", "invalid value 'soon' for --image-ttl"),
    ("file", {}, "image-ttl = 1.5\n", "invalid value 1.5 for --image-ttl"),
    ("file", {}, "allow-private-urls = 1\n", "--allow-private-urls takes true or false"),
    ("file", {}, "safety-action = 'drop'\n", "choose from flag, block"),
    ("file", {}, "image-ttl = \n", "is not valid TOML"),
    ("env", {"K5SERVE_PORT": "eighty"}, None, "environment variable K5SERVE_PORT: invalid value 'eighty'"),
    ("env", {"K5SERVE_ALLOW_PRIVATE_URLS": "maybe"}, None, "K5SERVE_ALLOW_PRIVATE_URLS: invalid value 'maybe'"),
    ("env", {"K5SERVE_SAFETY_THRESHOLD": "2"}, None, "must be between 0 and 1"),
    ("env", {"K5SERVE_OFFLOAD": "all"}, None, "choose from none, model, sequential"),
    ("env", {"K5SERVE_IMAGE_STORE": "s3://My_Bucket/x"}, None, "expected s3://bucket/prefix with an S3 bucket name"),
    ("env", {"K5SERVE_IMAGE_STORE": "s3://bucket/a/../b"}, None, "the prefix may not have empty, '.' or '..' parts"),
    ("env", {"K5SERVE_IMAGE_STORE": "gs://bucket"}, None, "expected a folder or s3://bucket/prefix"),
    ("env", {"K5SERVE_S3_ENDPOINT": "minio:9000"}, None, "expected an http:// or https:// URL"),
    ("env", {"K5SERVE_S3_ENDPOINT": "https://key:secret@minio:9000"}, None, "no credentials in the URL"),
    ("env", {"K5SERVE_IMAGE_URLS": "signed"}, None, "choose from proxy, presigned"),
    ("file", {}, "ray-app = 'my app'\n", "letters, digits, '_' and '-', at most 64"),
])
def test_bad_values_name_the_option_and_the_source(tmp_path, source, env, file, message):
    with pytest.raises(opt.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        resolve([], env, file, tmp_path)


def test_every_serve_option_has_a_variable_in_help():
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["serve"].format_help().split())
    for option in opt.SERVE_OPTIONS:
        assert f"--{option.name}" in help_text and option.env in help_text, option.name
    assert {o.target for o in opt.SERVE_OPTIONS} >= {ServerConfig, EngineConfig}
    # each option fills a real field of its dataclass, with that field's default
    for option in opt.SERVE_OPTIONS + opt.LOG_OPTIONS:
        field = {f.name: f for f in dataclasses.fields(option.target)}[option.field]
        assert option.default == field.default


def test_cli_refuses_an_unknown_key_and_a_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('port = 9000\nwrokers = "ray"\n')
    res = k5serve("serve", "--tiny", "--data-dir", str(tmp_path), "--config", str(bad))
    assert res.returncode == 2 and "unknown option 'wrokers'" in res.stderr
    res = k5serve("serve", "--tiny", "--data-dir", str(tmp_path), env=dict(ENV, K5SERVE_CONFIG=str(tmp_path / "no")))
    assert res.returncode == 2 and "cannot read the config file" in res.stderr


def test_cli_refuses_options_that_need_another(tmp_path):
    res = k5serve("serve", "--tiny", "--data-dir", str(tmp_path), "--image-urls", "presigned")
    assert res.returncode != 0 and "--s3-endpoint and --image-urls need an s3:// --image-store" in res.stderr
    res = k5serve("serve", "--tiny", "--data-dir", str(tmp_path), "--ray-app", "other")
    assert res.returncode != 0 and "--ray-app and --replica-threads need --workers ray" in res.stderr


def test_a_server_configured_by_file_and_environment(tmp_path_factory, data_dir):
    """The real server: keys from the file, the task limit from the environment overriding the file's."""
    home = own_data_dir(tmp_path_factory, data_dir, "configured")
    config = Path(home) / "k5serve.toml"
    config.write_text(f'api-key = ["{API_KEY}"]\nmax-tasks-per-request = 5\nimage-ttl = 600\n')
    srv = RunningServer(home, "--config", str(config), env={"K5SERVE_MAX_TASKS_PER_REQUEST": "2"})
    try:
        assert httpx.post(srv.url + "/v1", json=[{"taskType": "ping", "ping": True}]).status_code == 401
        headers = {"Authorization": f"Bearer {API_KEY}"}
        ping = {"taskType": "ping", "ping": True}
        assert httpx.post(srv.url + "/v1", json=[ping, ping], headers=headers).status_code == 200
        too_many = httpx.post(srv.url + "/v1", json=[ping] * 3, headers=headers)
        assert too_many.status_code == 400 and too_many.json()["errors"][0]["code"] == "maxTasksExceeded"
        assert too_many.json()["errors"][0]["max"] == 2
        done = httpx.post(srv.url + "/v1", json=[task()], headers=headers, timeout=300)
        assert done.status_code == 200, done.text
    finally:
        srv.stop()
