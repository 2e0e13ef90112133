"""Development tools (bench, demo, the SEV simulator, replay pictures): nothing on the agent's path imports them."""
