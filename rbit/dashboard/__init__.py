"""``rbit dashboard``: one web page showing the fleet, live.

Modules: :mod:`~rbit.dashboard.settings` (``[dashboard]``), :mod:`~rbit.dashboard.gather`
(the fleet, in rounds), :mod:`~rbit.dashboard.live` (statuses, pushed to the page),
:mod:`~rbit.dashboard.jobs` (recent jobs), :mod:`~rbit.dashboard.actions` (the
buttons), :mod:`~rbit.dashboard.server` (HTTP), :mod:`~rbit.dashboard.app` (the
command). The page itself is in ``static/``: HTML, one script, one stylesheet, no
build step and nothing fetched from elsewhere.
"""
