"""The sessionbus console: a web view of sessions, their history, modules, queues and
dead letters, for operators and auditors.

Served by ``sessionctl console`` and by ``sessionctl coordinator --console-port``,
on 127.0.0.1 unless told otherwise. A person signs in with their RabbitMQ user; the
console opens the bus as that user (``auth``), reads and acts only through the same
``CoordinatorClient`` and ``sessionctl.admin`` code ``sessionctl`` uses (``app``), and
follows the events exchange through a queue of its own for live updates (``feed``).
Pages are rendered on the server (Jinja2); ``static/console.js`` adds live updates and
the overview's charts; every asset is in this package (no CDN, works offline).

URL map (stable; element ids and ``data-testid`` attributes in the templates are too):

=================================  ======  ===============================================
path                               method  what
=================================  ======  ===============================================
``/``                              GET     redirect to ``/sessions``
``/login``                         GET     sign-in form (``#login-form``: ``#login-user``,
                                           ``#login-password``, ``#login-submit``)
``/login``                         POST    sign in (form: user, password, csrf, next);
                                           429 with ``Retry-After`` and
                                           ``#login-error`` after too many failed
                                           sign-ins for the user or from the address
                                           (``ConsoleSettings.sign_in_limits``)
``/logout``                        POST    sign out (``#sign-out``; form: csrf)
``/sessions``                      GET     sessions list; query: ``q`` (any id: workflow or
                                           module session; the first page adds the
                                           destroyed sessions it finds, marked
                                           destroyed), ``status``, ``module``,
                                           ``created_from``, ``created_to`` (ISO 8601, UTC
                                           unless zoned), ``errors=1`` (a failure recorded),
                                           ``stale=MINUTES`` (idle at least that long),
                                           ``order=newest|oldest``, ``limit`` (1-500),
                                           ``after`` (keyset cursor of ``#next-page``).
                                           Rows: ``tr[data-testid=session-row]
                                           [data-session-id]``, ``#session-<id>``
``/sessions/feed``                 GET     server-sent events: ``session`` (one per session
                                           event: session_id, type, version, at, actor,
                                           status …), ``ready``, ``missed``,
                                           ``resync`` (the broker connection was lost and
                                           restored: read the view again);
                                           ``?session=ID`` for one session; 204 without a
                                           live feed
``/sessions/<id>``                 GET     session page: ``#session-tree``, ``#timeline``
                                           (rows ``#event-v<N>``, ``.has-error``,
                                           ``.broken``), ``#chain-verdict``
                                           (``data-ok``, ``data-first-bad-version``),
                                           ``#integrity-report``; ``?version=N`` or
                                           ``?as_of=T``: ``#as-of-state`` (as
                                           ``sessionctl sessions history --version/--as-of``)
``/sessions/<id>/destroy``         POST    destroy (form: csrf; ``confirm=1``, else the
                                           confirmation page ``#confirm-form``)
``/sessions/<id>/repair``          POST    repair integrity (form: csrf)
``/dead-letters``                  GET     dead letters grouped by reason
                                           (``[data-testid=dead-letter-group]``, letters
                                           ``#letter-<offset>``), headers, decoded body
``/dead-letters/replay``           POST    replay (form: csrf; ``offset`` repeated, or
                                           ``all=1``)
``/dead-letters/discard``          POST    discard (as replay; ``confirm=1``, else the
                                           confirmation page)
``/modules``                       GET     registered modules (``#modules-table``)
``/queues``                        GET     queues of the prefix (``#queues-table``)
``/overview``                      GET     figures and small charts (``#overview-figures``)
``/overview/figures``              GET     the overview's figures as JSON (polled)
``/static/…``                      GET     console.css, console.js
=================================  ======  ===============================================

Every action is a POST carrying the sign-in's CSRF token; bad input in a form or query
string answers 400 with ``#error-message`` naming the field; a refusal by the
coordinator or the broker answers 403 with what it said.
"""

from __future__ import annotations

from sessionctl.console.app import ConsoleSettings, create_app
from sessionctl.console.server import ConsoleServer

__all__ = ["ConsoleServer", "ConsoleSettings", "create_app"]
