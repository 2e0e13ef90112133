"""The wire protocols, one module each, used by both of their sides.

* :mod:`agent.protocol.owner`: the guest owner's ``/v1/secret`` and
  ``/v1/session`` requests and answers (the agent builds requests and parses
  answers, the owner parses requests and builds answers);
* :mod:`agent.protocol.control`: the control socket's routes, requests and
  answers (``keyagent ctl`` and :mod:`agent.app.control`);
* :mod:`agent.protocol.eventlog`: the event log's record format and its
  version (:mod:`agent.app.eventlog` writes and reads it, replay checks it).

Pure: no I/O, no clock, no ``cryptography``; they import only
:mod:`agent.common` and :mod:`agent.sev.sizes`, so the core may use them.
"""
