"""Who is calling and what they may do: the studio's owner and its visitors, and the limits that
keep one visitor from starving the rest.

The *owner* (the operator) trains, uploads, renames, deletes and publishes adapters, sets the
default adapter of new sessions and cancels or resumes any job. A *visitor* chats, uses the media
tabs, picks any published adapter for their own session and, where the owner allows it, trains
within limits. The owner is whoever signs in with STUDIO_AUTH (user:password) or
STUDIO_OWNER_TOKEN, in the page's owner box or, for programs, with the `X-Studio-Owner-Token`
header. On loopback with neither set (and not --public), the one user is the owner, as a local
tool should be.

Every check runs on the server, in the handler (`Studio` calls `require_owner` and `admit`):
the page only mirrors them by disabling what a visitor cannot use.
"""
from __future__ import annotations

import collections
import hmac
import re
import threading
import time
from dataclasses import dataclass, field

from core.errors import LimitError, TooLargeError, UserError

OWNER_HEADER = "x-studio-owner-token"
VISITOR_COOKIE = "studio_visitor"
VISITOR_ID = re.compile(r"[0-9a-f]{32}")  # what the server's middleware puts in the cookie
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Caller:
    role: str          # "owner" | "visitor"
    id: str            # whose jobs and adapters: "owner", or the visitor's cookie (else their session)
    session: str = ""  # the browser session (Gradio's session hash); "" in-process
    ip: str = ""

    @property
    def is_owner(self) -> bool:
        return self.role == "owner"


OWNER = Caller("owner", "owner")  # in-process callers: the CLI, tests, benches
ANYONE = Caller("visitor", "")    # what anyone may see: the page as it is built, before it knows who loads it


@dataclass
class Limits:
    """What one visitor may ask of the shared machine. The owner is not limited."""
    message_chars: int = 4000          # one chat message
    max_new_tokens: int = 512          # one reply
    upload_mb: dict = field(default_factory=lambda: {"adapter": 64, "dataset": 20, "media": 25})
    requests_per_minute: int = 20      # chat and media replies asked, per session
    replies_per_session: int = 2       # replies queued or running at once, per session
    replies_per_ip: int = 6            # the same per address (looser: several people may share one)
    visitor_records: int = 2000        # a visitor's training job: records, steps, sequence length
    visitor_steps: int = 300
    visitor_seq_len: int = 512
    jobs_waiting: int = 8              # jobs in line at once (anyone's)
    sign_ins_per_minute: int = 5       # failed owner sign-ins, per address (then even the right one waits)

    @property
    def largest_upload_mb(self) -> int:
        return max(self.upload_mb.values())


class RateWindow:
    """How many events each key had in the last `window_s` seconds (a sliding window)."""

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self._times: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def full(self, key: str, limit: int) -> bool:
        """Whether `key` had `limit` events in the window already."""
        now = time.monotonic()
        with self._lock:
            times = self._times[key]
            while times and now - times[0] > self.window_s:
                times.popleft()
            return len(times) >= limit

    def add(self, key: str):
        with self._lock:
            self._times[key].append(time.monotonic())


class Access:
    def __init__(self, public: bool = False, login: tuple[str, str] | None = None, token: str | None = None,
                 visitor_training: bool = False, limits: Limits | None = None, trust_proxy: bool = False):
        self.public, self.login, self.token = public, login, token or None
        self.visitor_training = visitor_training
        self.limits = limits or Limits()
        # behind a proxy (a Space) the client's address is the last X-Forwarded-For entry: the one the
        # proxy appended (earlier entries come from the client and could be anything)
        self.trust_proxy = trust_proxy
        self._signed_in: set[str] = set()  # caller ids (visitor cookie or session) that signed in as the owner
        self._requests, self._failed_sign_ins = RateWindow(), RateWindow()

    @property
    def everyone_is_owner(self) -> bool:
        """A local tool: not public and no owner secret set."""
        return not self.public and not self.login and not self.token

    @property
    def owner_can_sign_in(self) -> bool:
        return bool(self.login or self.token)

    # -- who is calling ---------------------------------------------------------------------
    def caller(self, request) -> Caller:
        """The Caller behind a Gradio request (or any object with headers, cookies, client and
        session_hash); None is an in-process call, by the owner."""
        if request is None:
            return OWNER
        session, ip, who = getattr(request, "session_hash", None) or "", self.client_ip(request), self._who(request)
        headers = getattr(request, "headers", None) or {}
        token = headers.get(OWNER_HEADER)
        if self.everyone_is_owner or who in self._signed_in or (token and self._is_token(token)):
            return Caller("owner", "owner", session, ip)
        return Caller("visitor", who, session, ip)

    def client_ip(self, request) -> str:
        headers = getattr(request, "headers", None) or {}
        forwarded = headers.get("x-forwarded-for") if self.trust_proxy else None
        if forwarded:
            return forwarded.split(",")[-1].strip()
        client = getattr(request, "client", None)
        return getattr(client, "host", "") or ""

    def sign_in(self, request, user: str, secret: str) -> Caller:
        """The owner box: STUDIO_AUTH's user and password, or STUDIO_OWNER_TOKEN (user left empty)."""
        caller = self.caller(request)
        if caller.is_owner:
            return caller
        if not self.owner_can_sign_in:
            raise UserError("this studio has no owner sign-in: its operator sets STUDIO_OWNER_TOKEN or STUDIO_AUTH")
        if self._failed_sign_ins.full(caller.ip, self.limits.sign_ins_per_minute):
            raise LimitError("too many failed sign-ins from this address; wait a minute")
        ok = self._is_token(secret or "") or bool(
            self.login and hmac.compare_digest(user or "", self.login[0]) and hmac.compare_digest(secret or "",
                                                                                                 self.login[1]))
        if not ok:
            self._failed_sign_ins.add(caller.ip)
            raise UserError("wrong owner user or password/token")
        self._signed_in.add(caller.id)
        return Caller("owner", "owner", caller.session, caller.ip)

    def sign_out(self, request):
        self._signed_in.discard(self._who(request))

    def _who(self, request) -> str:
        """The visitor's cookie (it outlives a page reload), else their session."""
        session = getattr(request, "session_hash", None) or ""
        cookie = (getattr(request, "cookies", None) or {}).get(VISITOR_COOKIE, "")
        return cookie if VISITOR_ID.fullmatch(cookie) else f"session-{session or self.client_ip(request)}"

    def _is_token(self, given: str) -> bool:
        return bool(self.token) and hmac.compare_digest(given.encode(), self.token.encode())

    # -- what they may do -------------------------------------------------------------------
    def require_owner(self, caller: Caller, action: str):
        if not caller.is_owner:
            how = ("sign in as the owner first (the Owner box at the top of the page)" if self.owner_can_sign_in
                   else "this studio's operator sets STUDIO_OWNER_TOKEN to allow it")
            raise UserError(f"{action} is for the studio's owner; {how}")

    def require_training(self, caller: Caller):
        if not caller.is_owner and not self.visitor_training:
            self.require_owner(caller, "training")

    def admit(self, caller: Caller, message: str, max_new_tokens: int, in_flight: tuple[int, int]):
        """Refuse a visitor's chat request over a limit; `in_flight`: their session's and their
        address's replies queued or running now."""
        if caller.is_owner:
            return
        lim = self.limits
        if len(message) > lim.message_chars:
            raise TooLargeError(f"the message is {len(message)} characters; accepted here: up to {lim.message_chars}")
        if max_new_tokens > lim.max_new_tokens:
            raise UserError(f"max new tokens {max_new_tokens} is over this studio's limit; accepted: "
                            f"1 to {lim.max_new_tokens}")
        session_busy, ip_busy = in_flight
        if session_busy >= lim.replies_per_session or ip_busy >= lim.replies_per_ip:
            raise LimitError(f"you have {max(session_busy, ip_busy)} replies on the way already; wait for them "
                            f"(limit {lim.replies_per_session} per session, {lim.replies_per_ip} per address)")
        key = caller.session or caller.ip
        if self._requests.full(key, lim.requests_per_minute):
            raise LimitError(f"too many requests: {lim.requests_per_minute} a minute per session; wait a moment")
        self._requests.add(key)

    def check_upload(self, caller: Caller, path, what: str):
        """A visitor's upload over its size limit is refused (what: adapter, dataset or media)."""
        if caller.is_owner or path is None:
            return
        from pathlib import Path
        size = Path(path).stat().st_size
        cap = self.limits.upload_mb[what]
        if size > cap * 2**20:
            raise TooLargeError(f"{Path(path).name} is {size / 2**20:.1f} MB; accepted here: {what} files up to {cap} MB")
