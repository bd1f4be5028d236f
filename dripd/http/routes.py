"""The HTTP routes beyond health: the public API, intake, unsubscribe and short-link redirects;
the API document."""

from __future__ import annotations

from starlette.routing import BaseRoute

from dripd.http import api, leads, links, unsubscribe, webhooks
from dripd.http.context import HttpContext
from dripd.http.openapi import openapi_route


def http_routes(ctx: HttpContext) -> list[BaseRoute]:
    """The public listener's routes the configuration enables (the lead form only with
    `leads.enabled`)."""
    routes = [
        *api.routes(ctx),
        *unsubscribe.routes(ctx),
        *links.routes(ctx),
        *webhooks.routes(ctx),
    ]
    if ctx.config.leads.enabled:
        routes += leads.routes(ctx)
    return routes


def admin_routes(ctx: HttpContext) -> list[BaseRoute]:
    """The admin listener's routes beside health and metrics: `/openapi.json`, describing
    the API routes among `http_routes`."""
    operations = list(api.OPERATIONS)
    if ctx.config.leads.enabled:
        operations.append(leads.OPERATION)
    return [openapi_route(operations)]
