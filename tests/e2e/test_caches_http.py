"""The caches through the running service: a chat's later turns resume in the replica, the router decodes
a resent image once and hands it over by reference, the metrics count it, and with several replicas the turns
of a chat find theirs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.conftest import FULL_APP, app_args, chat_turns, process_info, temporary_app
from tests.e2e.test_observability import scrape, value
from tests.waiting import wait_until


def test_a_chats_later_turns_resume_from_the_prefix_and_the_metrics_count_it(client, metrics_port):
    before_info = process_info(FULL_APP, "instruct")
    before_replica, before_media = before_info["prefix_cache"], before_info["media_store"]
    before = scrape(metrics_port)
    chat_turns(client, "", _image(200), 3)  # an image no other test sends: its first decode is a miss
    after_info = process_info(FULL_APP, "instruct")
    after_replica, after_media = after_info["prefix_cache"], after_info["media_store"]
    assert after_replica["hits"] - before_replica["hits"] == 2, "turns 2 and 3 resumed"
    assert 0 < after_replica["bytes"]
    assert after_media["hits"] - before_media["hits"] == 2, "turns 2 and 3 sent the image by reference"
    assert after_media["misses"] == before_media["misses"] and after_media["bytes"] > 0

    def counted():
        now = scrape(metrics_port)
        def grew(name, **labels):
            return value(now, name, **labels) - value(before, name, **labels)
        ok = (grew("ray_minicpm_cache_lookups_total", cache="prefix", result="hit") == 2
              and grew("ray_minicpm_prefix_cache_hit_tokens_total") > 0
              and grew("ray_minicpm_cache_lookups_total", cache="decoded", result="hit") == 2
              and grew("ray_minicpm_cache_lookups_total", cache="media", result="hit") == 2
              and value(now, "ray_minicpm_cache_bytes", cache="prefix") > 0)
        return ok

    wait_until(counted, timeout=60, interval=0.5, what="the cache metrics of the chat")


@pytest.mark.timeout(300)
def test_with_two_replicas_every_later_turn_reaches_the_replica_holding_its_chat(serve_url):
    """Ten chats of two turns: every second turn resumes from the prefix cache, so each went to the replica
    that served its first turn (power of two choices would send about half elsewhere)."""
    args = app_args(thinking=None, router={"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}})
    args["instruct"]["deployment"] = {**args["instruct"]["deployment"], "num_replicas": 2,
                                      "ray_actor_options": {"num_cpus": 0.1}}
    with temporary_app("affinity", "/affinity", args), httpx.Client(base_url=serve_url, timeout=120) as http:
        for chat in range(10):
            chat_turns(http, "/affinity", _image(chat), 2)
        infos = _every_replica("affinity", "instruct", 2)
    assert sum(info["prefix_cache"]["hits"] for info in infos) == 10
    assert sum(info["prefix_cache"]["misses"] for info in infos) == 10, "each first turn missed, once"
    assert sum(info["media_store"]["hits"] for info in infos) == 10, "each second turn's image went by reference"
    assert sum(info["media_store"]["misses"] for info in infos) == 0


@pytest.mark.timeout(300)
def test_a_replica_that_lacks_an_image_sent_by_reference_gets_it_resent_and_answers_the_same(client, serve_url):
    """A replica whose media store cannot hold the image asks for each later turn's reference again; the router
    resends the turn in full, the answers are those of a replica that held it."""
    image = _image(201)
    expected = [answer["choices"][0]["message"]["content"] for answer in chat_turns(client, "", image, 3)]
    args = app_args(thinking=None, router={"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}})
    args["instruct"] = {"model": {**args["instruct"]["model"], "media_store_bytes": 1},
                        "deployment": {**args["instruct"]["deployment"], "ray_actor_options": {"num_cpus": 0.1}}}
    with temporary_app("handoff", "/handoff", args), httpx.Client(base_url=serve_url, timeout=120) as http:
        answers = chat_turns(http, "/handoff", image, 3)
        info = process_info("handoff", "instruct")
    assert [answer["choices"][0]["message"]["content"] for answer in answers] == expected
    assert info["media_store"] == {"bytes": 0, "hits": 0, "misses": 2}, "turns 2 and 3: asked for again, then resent"
    assert info["prefix_cache"]["hits"] == 2, "the resent turns still resumed from the prefix cache"


def _image(seed: int) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (seed * 20 % 256, 90, 160)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _every_replica(app: str, deployment: str, replicas: int) -> list[dict]:
    """process_info of each replica (calls without an affinity key land on replicas at random)."""
    seen: dict[int, dict] = {}

    def ask() -> bool:
        with ThreadPoolExecutor(1) as pool:
            info = pool.submit(process_info, app, deployment).result()
        seen[info["pid"]] = info
        return len(seen) == replicas

    wait_until(ask, timeout=60, interval=0.05, what=f"answers from all {replicas} replicas")
    return list(seen.values())
