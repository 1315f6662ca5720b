"""``worldflow play``: the world model as a game in the browser (docs/play.md).

A local web server streams a run's imagined frames to a page that maps the keyboard to the run's
actions; ``--env`` shows the real environment beside the dream, driven by the same keys from the same
start. Modules: :mod:`~worldflow.play.keys` (keyboard -> action), :mod:`~worldflow.play.sources` (real
context clips), :mod:`~worldflow.play.dream` (bounded-memory generation through the world-model env's
streams), :mod:`~worldflow.play.real` (the aligned real env), :mod:`~worldflow.play.game` (one player's
game), :mod:`~worldflow.play.protocol` (the WebSocket messages) and :mod:`~worldflow.play.server` (the
aiohttp server; aiohttp is the optional extra ``play``). Nothing here imports aiohttp but the server.
"""
