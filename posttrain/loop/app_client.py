"""HTTP plumbing of :class:`posttrain.loop.app_source.AppSource`: an admin's bearer token (made from
username + password with ``POST /api/token`` when none is given, and made again once when it
expires), retries of failed connections, 5xx and 429 with backoff, and clear errors for the rest.

The class is a mixin: the source sets ``name``, ``url`` (no trailing slash), ``token``, ``username``,
``password``, ``retries``, ``timeout_s`` and ``_client = None``.
"""

from __future__ import annotations

import json
import time

from posttrain.errors import ConfigError, ServiceError


class AppClient:
    """Requests to the labeling app (``posttrain label serve``) as an admin."""

    name: str
    url: str
    token: str | None
    username: str | None
    password: str | None
    retries: int
    timeout_s: float
    _client = None

    @property
    def http(self):
        import httpx

        if self._client is None:
            self._client = httpx.Client(timeout=httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s)))
        return self._client

    def _login(self) -> str:
        r = self._send("POST", "/api/token", "getting an API token", json={"username": self.username,
                                                                            "password": self.password}, auth=False)
        if r.status_code in (401, 403):
            raise ConfigError(f"{self.url} refused user {self.username!r} and the given password "
                              f"(HTTP {r.status_code}: {self._detail(r)})", where=f"feedback source {self.name}",
                              fix="check username and password (posttrain label add-user name=... role=admin "
                                  "update=true resets it)")
        self.token = self._ok(r, "POST /api/token")["token"]
        return self.token

    def _send(self, method: str, path: str, what: str, *, auth: bool = True, **kw):
        import httpx

        url, last, relogged, attempt = self.url + path, "", False, 0
        while True:
            headers = {"Authorization": f"Bearer {self.token or self._login()}"} if auth else {}
            try:
                r = self.http.request(method, url, headers=headers, **kw)
            except httpx.HTTPError as e:  # could not connect, reset, timed out
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if r.status_code == 401 and auth and self.username and self.password and not relogged:
                    self.token, relogged = None, True  # an expired token: make a new one, once
                    continue
                if r.status_code < 500 and r.status_code != 429:
                    return r
                last = f"HTTP {r.status_code}: {self._detail(r)}"
            if attempt >= self.retries:
                raise ServiceError(f"{what} failed after {attempt + 1} tries ({last})", where=url,
                                   fix=f"check that the labeling app runs at {self.url} (GET {self.url}/healthz; start "
                                       "it with `posttrain label serve port=...`) and that url is right; the loop can "
                                       "be resumed once it is back")
            attempt += 1
            time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))

    @staticmethod
    def _detail(r) -> str:
        try:
            body = r.json()
            return str(body.get("detail", body) if isinstance(body, dict) else body)[:500]
        except ValueError:
            return r.text[:300]

    def _ok(self, r, what: str, *, ndjson: bool = False):
        """The answer's JSON; a clear error for anything but 2xx."""
        url = str(r.request.url)
        if r.status_code == 401:
            raise ConfigError(f"{what}: {self.url} refused the API token (HTTP 401: {self._detail(r)})",
                              where=f"feedback source {self.name}: token",
                              fix="tokens expire (token_days); make a new one with POST /api/token or "
                                  "`posttrain label add-user name=... update=true token=true`, or give username + "
                                  "password so the source makes its own")
        if r.status_code == 403:
            raise ConfigError(f"{what}: {self.url} answered HTTP 403 ({self._detail(r)})",
                              where=f"feedback source {self.name}",
                              fix="the source needs an admin's token or credentials (role=admin)")
        if not 200 <= r.status_code < 300:
            raise ServiceError(f"{what}: {url} answered HTTP {r.status_code}: {self._detail(r)}", where=url,
                               fix="read the labeling app's log")
        try:
            if ndjson:
                return [json.loads(line) for line in r.text.splitlines() if line.strip()]
            return r.json()
        except ValueError:
            raise ServiceError(f"{what}: {url} answered something that is not JSON: {r.text[:200]!r}",
                               where=url, fix=f"is {self.url} the labeling app (posttrain label serve)?") from None
