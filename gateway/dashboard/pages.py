"""The dashboard's HTML: one small server-rendered shell per page; the JSON API fills it.

Every string that reaches a page is escaped here (`html.escape`, quotes too) or inserted by
the script as text (`textContent`, never `innerHTML`), and the Content-Security-Policy allows
only the dashboard's own script file: a replica printing `<script>` shows that text.
"""

from __future__ import annotations

from html import escape

NAV = (("/", "Overview"), ("/processes", "Processes"), ("/logs/gateway", "Gateway log"),
       ("/records", "Prediction records"))

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def page(kind: str, title: str, data: dict[str, str] | None = None, body: str = "",
         logout: bool = False) -> str:
    attrs = " ".join(f'data-{escape(k)}="{escape(v)}"' for k, v in (data or {}).items())
    nav = "".join(f'<a href="{href}">{escape(label)}</a>' for href, label in NAV)
    if logout:
        nav += '<a class="logout" href="/logout">Log out</a>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} · gRPC gateway</title>
<link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/dashboard.js" defer></script>
</head><body data-page="{escape(kind)}" {attrs}>
<header><span class="brand">gRPC gateway</span><nav>{nav}</nav>
<span id="live" class="live" title="refreshed every few seconds"></span></header>
<main><h1 id="title">{escape(title)}</h1>
{body}<div id="root"><p class="muted">Loading…</p></div>
<p id="error" class="error" hidden></p></main>
</body></html>"""


def login(next_path: str, failed: bool) -> str:
    msg = '<p class="error">That token is not the admin token.</p>' if failed else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Log in · gRPC gateway</title>
<link rel="stylesheet" href="/static/dashboard.css"></head>
<body data-page="login"><header><span class="brand">gRPC gateway</span></header>
<main class="login"><h1>Log in</h1>
<p>This gateway has an admin token (<code>admin.token</code> in its config).</p>{msg}
<form method="post" action="/login">
<input type="hidden" name="next" value="{escape(next_path)}">
<label>Admin token <input type="password" name="token" id="token" autocomplete="off"
 autofocus></label> <button type="submit" id="login">Log in</button></form></main>
</body></html>"""
