"""The MapCoder-Lite agent pipeline.

Modules (import them directly; nothing is re-exported here):
  prompts    the four agents' chat prompts            parsers   forgiving answer parsers
  llm        ChatClient: OpenAI endpoint or AsyncEngine  mapcoder  the protocol and its Trajectory
  datasets   HumanEval/MBPP/APPS/xCodeEval -> Problem  judge     tests and verdicts in the sandbox
  sandbox    isolated execution of untrusted code      evaluate  N problems at once, JSONL + summary
The training module builds on prompts, parsers, sandbox/judge and ``mapcoder.Trajectory``.
"""
