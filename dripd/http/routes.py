"""Every route of the daemon's HTTP surface beyond health: the API, intake, unsubscribe."""

from __future__ import annotations

from starlette.routing import BaseRoute

from dripd.http import api, leads, unsubscribe
from dripd.http.context import HttpContext
from dripd.http.openapi import openapi_route


def http_routes(ctx: HttpContext) -> list[BaseRoute]:
    """The routes the configuration enables (the lead form only with `leads.enabled`), and
    `/openapi.json` describing the API among them."""
    routes = [*api.routes(ctx), *unsubscribe.routes(ctx)]
    operations = list(api.OPERATIONS)
    if ctx.config.leads.enabled:
        routes += leads.routes(ctx)
        operations.append(leads.OPERATION)
    return [*routes, openapi_route(operations)]
