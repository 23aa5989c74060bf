"""`pbs-engine chat`: a terminal conversation with streamed answers; piped stdin makes it scriptable.

Commands: /reset (forget the conversation), /system TEXT (set the system message and reset), /exit.
Ctrl-C while an answer streams stops it (the request is aborted) and returns to the prompt.
"""
from __future__ import annotations

import argparse
import signal
import sys
from contextlib import closing, contextmanager, nullcontext
from typing import Iterator

from pbs_engine.cli.common import add_model_args, add_sampling_args, load_llm, sampling_params

COMMANDS_HELP = "commands: /reset, /system TEXT, /exit (Ctrl-C stops an answer, Ctrl-D quits)"


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal",
                       description="Chat in the terminal. " + COMMANDS_HELP + ". When stdin is not a terminal, "
                                   "each line is a user message and each answer is printed on its own.")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--verbose", "-v", action="store_true")
    add_sampling_args(p, max_tokens=512, temperature=0.7)
    add_model_args(p)
    p.set_defaults(func=run)


class ChatSession:
    """A conversation with an engine: the history, and one streamed answer at a time."""

    def __init__(self, llm, params, system: str | None = None):
        self.llm = llm
        self.params = params
        self.system = system
        self.history: list[dict] = []  # user and assistant turns, oldest first
        self.stop_requested = False  # set from a signal handler: end the current answer after this step

    @property
    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def command(self, line: str) -> bool:
        """Apply a /command; False means /exit."""
        name, _, arg = line.strip().partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history.clear()
        elif name == "/system":
            self.system = arg.strip() or None
            self.history.clear()
        else:
            raise ValueError(f"unknown command {name!r}; {COMMANDS_HELP}")
        return True

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to `text`; a finished answer joins the history, a stopped one is dropped with its
        question. Closing the iterator early aborts the request."""
        self.history.append({"role": "user", "content": text})
        answer, finished, stream = "", False, None
        try:
            stream = self.llm.stream({"prompt_token_ids": self._prompt_ids()}, self.params)
            self.stop_requested = False
            for out in stream:  # one output per engine step that extends the answer
                piece, answer, finished = out.text[len(answer):], out.text, out.finished
                if piece:
                    yield piece
                if self.stop_requested:
                    break
        finally:
            if stream is not None:
                stream.close()  # aborts the request if it is still running
            if finished:
                self.history.append({"role": "assistant", "content": answer})
            else:
                self.history.pop()

    def _prompt_ids(self) -> list[int]:
        """The conversation as prompt ids, dropping the oldest exchanges until it leaves room for an answer."""
        tok, limit = self.llm.get_tokenizer(), self.llm.config.max_model_len
        room = self.params.max_tokens or 1
        ids = tok.encode_chat(self.messages)
        while len(ids) + room > limit and len(self.history) > 1:
            del self.history[:2]
            ids = tok.encode_chat(self.messages)
        if len(ids) + room > limit:
            raise ValueError(f"the message is {len(ids)} tokens; with --max-tokens {room} it does not fit "
                             f"--max-model-len {limit}")
        return ids


@contextmanager
def ctrl_c_stops(session: ChatSession):
    """While an answer streams, Ctrl-C asks the session to stop after the current engine step."""
    def handler(_signum, _frame):
        session.stop_requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def answer(session: ChatSession, text: str, interactive: bool) -> None:
    with closing(session.ask(text)) as pieces, (ctrl_c_stops(session) if interactive else nullcontext()):
        for piece in pieces:
            print(piece, end="", flush=True)
    if session.stop_requested:
        print(" [stopped]", end="")
    print(flush=True)


def read_lines(interactive: bool) -> Iterator[str]:
    """User input: prompted lines from a terminal (until Ctrl-D), or the lines of piped stdin."""
    if not interactive:
        yield from (line.rstrip("\n") for line in sys.stdin)
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            yield input("> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()


def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    llm = load_llm(args)
    if not llm.get_tokenizer().chat_template:
        raise ValueError(f"model {args.model!r} has no chat template; use `pbs-engine generate --raw`")
    session = ChatSession(llm, params, args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"pbs-engine chat: {COMMANDS_HELP}", file=sys.stderr)
    for line in read_lines(interactive):
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not session.command(line):
                    break
                continue
            answer(session, line, interactive)
        except ValueError as e:
            print(f"pbs-engine: {e}", file=sys.stderr)
    return 0
