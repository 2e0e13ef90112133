"""The control verbs (migrate, secret): they see the sidecar only as a FlowHost (agent.app.flowhost)."""
