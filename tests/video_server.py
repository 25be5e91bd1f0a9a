"""A local aiohttp server that serves test videos and the hostile answers a video URL can
give (redirects, HTML, a lying Content-Length), counting every request it receives."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web


class VideoHost:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/v/{name}", self._file)
        app.router.add_get("/redirect", self._redirect)
        app.router.add_get("/page", self._page)
        app.router.add_get("/truncated/{name}", self._truncated)
        app.router.add_get("/missing", self._missing)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _count(self, request: web.Request) -> None:
        self.requests.append(request.path_qs)

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self._count(request)
        path = self.root / request.match_info["name"]
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Content-Type": "video/mp4"})

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        self._count(request)
        raise web.HTTPFound(request.query["to"])

    async def _page(self, request: web.Request) -> web.StreamResponse:
        self._count(request)
        return web.Response(text="<html><body>not a video</body></html>", content_type="text/html")

    async def _truncated(self, request: web.Request) -> web.StreamResponse:
        """Announces the whole file but sends half of it, then closes."""
        self._count(request)
        data = (self.root / request.match_info["name"]).read_bytes()
        resp = web.StreamResponse(
            headers={"Content-Type": "video/mp4", "Content-Length": str(len(data))}
        )
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        assert request.transport is not None
        request.transport.close()
        return resp

    async def _missing(self, request: web.Request) -> web.StreamResponse:
        self._count(request)
        raise web.HTTPNotFound()
