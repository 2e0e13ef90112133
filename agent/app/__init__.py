"""The assembly: the runtime that runs flows, the sidecar, the launcher, the control server and its verbs."""
