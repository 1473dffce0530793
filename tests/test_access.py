"""Roles and limits in the studio itself, without a server: the checks every path (the page, a
crafted request, the API) goes through. The server-level tests are in tests/test_hosting.py."""
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.access import OWNER_HEADER, VISITOR_COOKIE, Access, Caller, Limits
from app.studio import NONE, Studio
from core.errors import UserError
from core.loading import load_model
from tests.helpers import persona_adapter, wait_for, write_data

VISITOR = Caller("visitor", "v-one", "session-one", "10.0.0.1")
OTHER = Caller("visitor", "v-two", "session-two", "10.0.0.2")


@pytest.fixture(scope="module")
def hosted(smollm2, tmp_path_factory):
    """A studio in public mode, as on a Space with an owner token set."""
    root = tmp_path_factory.mktemp("hosted")
    return Studio(smollm2, root / "adapters", root / "runs", access=Access(public=True, token="t0ken"))


def folder_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def request(cookie="", token=None, session="s", ip="10.1.1.1", forwarded=None):
    """What a Gradio request carries that the access rules read: headers, cookies, client, session."""
    headers = {OWNER_HEADER: token} if token else {}
    if forwarded:
        headers["x-forwarded-for"] = forwarded
    return SimpleNamespace(headers=headers, cookies={VISITOR_COOKIE: cookie} if cookie else {},
                           client=SimpleNamespace(host=ip), session_hash=session)


def test_a_visitor_is_refused_every_owner_action_and_nothing_changes(hosted, tmp_path):
    reg = hosted.registry
    names_before = set(reg.names())
    reg.add(persona_adapter(hosted.lm, tmp_path / "kept.safetensors", seed=5), "kept")
    reg.add(persona_adapter(hosted.lm, tmp_path / "theirs.safetensors", seed=6), "theirs", keeper=OTHER.id)
    before = folder_bytes(reg.folder)
    upload = persona_adapter(hosted.lm, tmp_path / "new.safetensors", seed=7)
    refused = {
        "setting the default adapter": lambda: hosted.make_default("kept", VISITOR),
        "deleting adapters": lambda: hosted.delete_adapter("kept", VISITOR),
        "renaming adapters": lambda: hosted.rename_adapter("kept", "mine", VISITOR),
        "adding adapters": lambda: hosted.add_adapter(str(upload), "new", VISITOR),
        "publishing adapters": lambda: hosted.publish_adapter("theirs", VISITOR),
        "training": lambda: hosted.start_job("pirate", None, 4, 2, False, False, 1, 0.01, 64, 1, 1, caller=VISITOR),
    }
    for action, call in refused.items():
        with pytest.raises(UserError, match=f"^{action} is for the studio's owner; sign in as the owner"):
            call()
    with pytest.raises(UserError, match="^deleting adapters is for the studio's owner"):
        hosted.delete_adapter("theirs", VISITOR)  # another visitor's adapter: not theirs to delete
    assert folder_bytes(reg.folder) == before and hosted.default_name is None and hosted.runner.jobs() == []
    # the owner does each of them
    assert hosted.add_adapter(str(upload), "new") == "new"
    assert hosted.rename_adapter("new", "renamed") == "renamed"
    assert "renamed" in hosted.make_default("renamed")
    hosted.publish_adapter("theirs")
    assert reg.keeper("theirs") is None and "theirs" in hosted.adapter_choices(VISITOR)
    for name in ("renamed", "kept", "theirs"):
        hosted.delete_adapter(name)
    assert hosted.default_name is None and set(reg.names()) == names_before


def test_the_owner_is_who_signs_in_or_sends_the_token():
    # behind a Space's proxy the address is the entry the proxy appended, not one the client wrote
    spoofed = request(ip="10.0.0.1", forwarded="6.6.6.6, 203.0.113.9")
    assert Access(public=True, trust_proxy=True).caller(spoofed).ip == "203.0.113.9"
    assert Access(public=True).caller(spoofed).ip == "10.0.0.1"  # no proxy to trust: the socket's address
    local = Access()  # loopback, no secret: the one user is the owner, as today
    assert local.caller(request()).is_owner and local.everyone_is_owner
    nobody = Access(public=True)  # public with no secret: nobody can become the owner
    assert not nobody.caller(request()).is_owner
    with pytest.raises(UserError, match="no owner sign-in"):
        nobody.sign_in(request(), "", "anything")

    access = Access(public=True, login=("ada", "pw"), token="t0ken", limits=Limits(sign_ins_per_minute=3))
    assert access.caller(request(token="t0ken")).is_owner  # a program's header
    assert not access.caller(request(token="t0ken!")).is_owner
    page = request(cookie="ab" * 16, session="s1")
    visitor = access.caller(page)
    assert visitor.role == "visitor" and visitor.id == "ab" * 16  # the cookie outlives a reload
    with pytest.raises(UserError, match="wrong owner user or password"):
        access.sign_in(page, "ada", "nope")
    assert access.sign_in(page, "ada", "pw").is_owner
    reloaded = request(cookie="ab" * 16, session="s2")  # the same browser after a reload
    assert access.caller(reloaded).is_owner and not access.caller(request(cookie="cd" * 16)).is_owner
    access.sign_out(reloaded)
    assert not access.caller(page).is_owner
    stranger = request(cookie="ef" * 16, ip="10.9.9.9")
    for _ in range(3):
        with pytest.raises(UserError, match="wrong"):
            access.sign_in(stranger, "", "guess")
    with pytest.raises(UserError, match="too many failed sign-ins"):
        access.sign_in(stranger, "", "t0ken")  # even the right token, once over the limit


def test_visitor_requests_over_the_limits_are_refused_with_one_line(hosted, tmp_path):
    history = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    lim = hosted.access.limits
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (lim.upload_mb["media"] * 2**20 + 1))
    with pytest.raises(UserError, match=f"big.png is {lim.upload_mb['media']:.1f} MB; accepted here: media files up to"):
        hosted.start_reply(history("What is this?"), "", 8, 0.0, 1.0, caller=VISITOR, adapter="image",
                           media=("image", str(big)))
    with pytest.raises(UserError, match=f"the message is {lim.message_chars + 1} characters; accepted here: up to"):
        hosted.start_reply(history("a" * (lim.message_chars + 1)), "", 8, 0.0, 1.0, caller=VISITOR)
    with pytest.raises(UserError, match="max new tokens 513 is over this studio's limit; accepted: 1 to 512"):
        hosted.start_reply(history("Hi."), "", 513, 0.0, 1.0, caller=VISITOR)
    hosted.start_reply(history("Hi."), "", 513, 0.0, 1.0)[0].cancelled.set()  # the owner is not limited
    busy = [hosted.start_reply(history("Count to fifty."), "", 200, 0.0, 1.0, caller=VISITOR)[0]
            for _ in range(lim.replies_per_session)]
    with pytest.raises(UserError, match="you have 2 replies on the way already"):
        hosted.start_reply(history("Hi."), "", 8, 0.0, 1.0, caller=VISITOR)
    other = hosted.start_reply(history("Hi."), "", 4, 0.0, 1.0, caller=OTHER)[0]  # another session is served
    assert "".join(other) and other.error is None
    for reply in busy:
        reply.cancelled.set()
    wait_for(lambda: hosted.engine.in_flight(VISITOR.session, VISITOR.ip) == (0, 0), timeout=30)
    flood = Access(public=True, limits=Limits(requests_per_minute=3))
    for _ in range(3):
        flood.admit(OTHER, "hi", 8, (0, 0))
    with pytest.raises(UserError, match="too many requests: 3 a minute per session"):
        flood.admit(OTHER, "hi", 8, (0, 0))
    flood.admit(VISITOR, "hi", 8, (0, 0))  # per session: another visitor is not held back


def test_a_private_adapter_is_seen_by_its_keeper_and_the_owner_until_published(hosted, tmp_path):
    reg = hosted.registry
    reg.add(persona_adapter(hosted.lm, tmp_path / "mine.safetensors", seed=8), "mine", keeper=VISITOR.id)
    assert "mine" in hosted.adapter_choices(VISITOR) and "mine" in hosted.adapter_choices()
    assert "mine" not in hosted.adapter_choices(OTHER)
    history = [{"role": "user", "content": "Name three colors."}]
    reply = hosted.start_reply(history, "", 12, 0.0, 1.0, caller=VISITOR, adapter="mine")[0]
    assert "".join(reply) and reply.adapter is reg.load("mine")
    with pytest.raises(UserError, match="no adapter named 'mine'; accepted: "):
        hosted.start_reply(history, "", 12, 0.0, 1.0, caller=OTHER, adapter="mine")
    assert hosted.start_reply(history, "", 2, 0.0, 1.0, caller=OTHER, adapter=NONE)[0].adapter is None
    with pytest.raises(UserError, match="publish it before making it the default"):
        hosted.make_default("mine")
    hosted.publish_adapter("mine")
    assert "mine" in hosted.adapter_choices(OTHER)
    reg.add(persona_adapter(hosted.lm, tmp_path / "gone.safetensors", seed=9), "gone", keeper=VISITOR.id)
    hosted.delete_adapter("gone", VISITOR)  # a visitor deletes their own
    assert "gone" not in reg.names()
    hosted.delete_adapter("mine")


def test_tiny_random_visitor_jobs_wait_in_line_one_each_and_their_adapters_stay_theirs(tmp_path, tiny_dir):
    """Two visitors train at once with one job allowed to run: the second waits in line, knows its
    place, and starts by itself when the first ends (real torchrun processes, tiny random model)."""
    lm = load_model(str(tiny_dir), "float32", "cpu")
    access = Access(public=True, token="t", visitor_training=True,
                    limits=Limits(visitor_steps=4, visitor_records=100, visitor_seq_len=256))
    studio = Studio(lm, tmp_path / "adapters", tmp_path / "runs", model_name=str(tiny_dir), access=access,
                    max_running_jobs=1)
    data = str(write_data(tmp_path / "say.jsonl", 64))
    job = lambda caller, **kw: studio.start_job("", kw.get("data", data), 4, 2, False, False, 100, 0.05,  # noqa: E731
                                                kw.get("seq", 256), kw.get("nproc", 1), 0, caller=caller)
    first = job(VISITOR)
    second = job(OTHER)
    assert studio.runner.view(first).state == "running"
    view = studio.runner.view(second)
    assert (view.state, view.position, view.by) == ("queued", 1, OTHER.id)
    with pytest.raises(UserError, match=f"you have a job already \\({first}, running\\); one at a time"):
        job(VISITOR)
    with pytest.raises(UserError, match=f"no job named '{first}' of yours"):
        studio.cancel_job(first, OTHER)
    assert studio.jobs(OTHER) == [second] and set(studio.jobs()) == {first, second}
    third = Caller("visitor", "v-three", "session-three")
    with pytest.raises(UserError, match="processes: visitors train with 1, got 2"):
        job(third, nproc=2)
    with pytest.raises(UserError, match="max sequence length 512 is over the visitors' limit; accepted: up to 256"):
        job(third, seq=512)
    with pytest.raises(UserError, match="big.jsonl: 200 records; visitors' datasets hold up to 100"):
        job(third, data=str(write_data(tmp_path / "big.jsonl", 200)))
    # the first ends (4 steps, the visitors' cap); the keeper launches the second, which ends too
    wait_for(lambda: studio.runner.view(second).state not in ("queued", "running"), timeout=240)
    for job_id in (first, second):
        view = studio.runner.view(job_id)
        assert view.state == "finished" and view.step == 4, (view, studio.runner.log_tail(job_id))
    wait_for(lambda: studio.registry.keeper(second) == OTHER.id, timeout=30)
    assert studio.registry.keeper(first) == VISITOR.id
    assert first in studio.adapter_choices(VISITOR) and first not in studio.adapter_choices(OTHER)
    assert {first, second} <= set(studio.adapter_choices())  # the owner sees both
    # a queued job leaves the line when cancelled, and the next one moves up
    blocker, waiting = job(VISITOR), job(OTHER)
    assert studio.runner.view(waiting).position == 1
    studio.cancel_job(waiting, OTHER)
    assert studio.runner.view(waiting).state == "cancelled" and studio.runner.waiting() == []
    studio.cancel_job(blocker)  # the owner cancels anyone's


def test_the_zerogpu_path_is_a_no_op_off_zerogpu_and_gives_the_engines_reply(hosted):
    from app import zerogpu
    assert not zerogpu.ON_ZERO_GPU and zerogpu.gpu(len) is len
    history = [{"role": "user", "content": "What is the capital of France?"}]
    queued = hosted.start_reply(history, "", 16, 0.0, 1.0)[0]
    expected = "".join(queued)
    alone = hosted.engine.submit(queued.ids, queued.params, queued=False)  # what a ZeroGPU call runs
    assert "".join(zerogpu.stream(hosted.engine, alone)) == expected and "Paris" in expected
    assert alone.tokens == queued.tokens and alone.first_token is not None and alone.finished is not None
