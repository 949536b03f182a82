"""Discord's edge as a bot meets it when it starts: log-in, slash-command sync and the gateway.

simcord drives a bot that is already connected. What comes before that goes over the
network (the token is checked, commands are synced, the gateway opens and may close with
an error), so it is tested against this small real server, with discord.py's real HTTP
and gateway code. Point discord.py at it by setting `discord.http.Route.BASE` to
`edge.api_url`.

    async with FakeDiscordEdge(token="good.token", close_code=4014) as edge:
        ...

It records what the bot sent (the commands it synced, its IDENTIFY) but never the token.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import WSMsgType, web

BOT_USER = {
    "id": "4242",
    "username": "Switchboard",
    "discriminator": "0",
    "global_name": None,
    "avatar": None,
    "bot": True,
}
OWNER = {"id": "7", "username": "owner", "discriminator": "0", "global_name": None, "avatar": None}


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py reads a body as JSON only when the content type is exactly this (no charset).
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"}
    )


class FakeDiscordEdge:
    """A Discord REST API and gateway that accepts one token, then closes the gateway with `close_code`."""

    def __init__(self, *, token: str, close_code: int = 4014) -> None:
        self._token = token
        self.close_code = close_code
        self.synced_commands: list[dict[str, Any]] = []
        self.identified: list[dict[str, Any]] = []  # IDENTIFY payloads, token removed
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    async def __aenter__(self) -> FakeDiscordEdge:
        app = web.Application()
        app.router.add_get("/api/v10/users/@me", self._me)
        app.router.add_get("/api/v10/oauth2/applications/@me", self._application)
        app.router.add_put("/api/v10/applications/{application_id}/commands", self._sync)
        app.router.add_get("/api/v10/gateway/bot", self._gateway_bot)
        app.router.add_get("/gateway", self._gateway)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bot {self._token}"

    async def _me(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        return _json(BOT_USER)

    async def _application(self, request: web.Request) -> web.Response:
        return _json(
            {
                "id": BOT_USER["id"],
                "name": "Switchboard",
                "description": "",
                "icon": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": OWNER,
                "verify_key": "0" * 64,
                "flags": 0,
                "summary": "",
            }
        )

    async def _sync(self, request: web.Request) -> web.Response:
        self.synced_commands = await request.json()
        application_id = request.match_info["application_id"]
        return _json(
            [
                {**c, "id": str(1000 + i), "application_id": application_id, "version": "1"}
                for i, c in enumerate(self.synced_commands)
            ]
        )

    async def _gateway_bot(self, request: web.Request) -> web.Response:
        return _json(
            {
                "url": f"ws://127.0.0.1:{self.port}/gateway",
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 1000,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }
        )

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(
            json.dumps({"op": 10, "d": {"heartbeat_interval": 45_000}, "s": None, "t": None})
        )
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            payload = json.loads(message.data)
            if payload.get("op") == 2:  # IDENTIFY
                self.identified.append({k: v for k, v in payload["d"].items() if k != "token"})
                await ws.close(code=self.close_code, message=b"refused by the fake")
                break
        return ws
