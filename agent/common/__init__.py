"""The leaf every layer shares: Secret, the exception tree, logging. Imports nothing else from agent."""
