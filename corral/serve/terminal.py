"""Terminal chat: a multi-turn conversation streamed from a local model or any OpenAI-compatible server.

Commands: /reset, /system TEXT, /save FILE (ShareGPT JSON), /help, /exit. Ctrl-C while a reply
streams stops that reply (the part shown is kept); Ctrl-C or Ctrl-D at the prompt leaves.
"""

from __future__ import annotations

import json
import sys
from typing import TextIO

from corral.atomic import atomic_write_text
from corral.chat.conversation import Conversation, Message
from corral.generate.sampling import SamplingParams
from corral.serve.backends import ChatBackend

HELP = """commands:
  /reset          start a new conversation (keeps the system prompt)
  /system TEXT    set the system prompt (empty TEXT removes it) and start over
  /save FILE      write the conversation as ShareGPT JSON
  /help           this text
  /exit           leave (also Ctrl-D)"""


def save_conversation(messages: list[Message], path: str) -> None:
    record = Conversation(list(messages)).to_sharegpt()
    atomic_write_text(path, json.dumps([record], ensure_ascii=False, indent=2) + "\n")


def chat_loop(backend: ChatBackend, params: SamplingParams, system: str | None = None, banner: str = "",
              read=input, out: TextIO = sys.stdout) -> list[Message]:
    """Run the conversation until /exit or end of input; returns the final messages."""
    history: list[Message] = []

    def messages() -> list[Message]:
        return ([Message("system", system)] if system else []) + history

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    if banner:
        say(banner)
    say("type a message, or /help")
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            say("")
            return messages()
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/exit", "/quit"):
                return messages()
            if command == "/help":
                say(HELP)
            elif command == "/reset":
                history.clear()
                say("(conversation cleared)")
            elif command == "/system":
                system = arg.strip() or None
                history.clear()
                say(f"(system prompt {'set' if system else 'removed'}; conversation cleared)")
            elif command == "/save":
                if not arg.strip():
                    say("usage: /save FILE")
                    continue
                try:
                    save_conversation(messages(), arg.strip())
                    say(f"(saved {len(messages())} messages to {arg.strip()})")
                except OSError as e:
                    say(f"(could not save: {e})")
            else:
                say(f"unknown command {command}; /help lists them")
            continue
        history.append(Message("user", line))
        reply = ""
        pieces = backend.stream(Conversation(messages()), params)
        try:
            for piece in pieces:
                reply += piece
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        except Exception as e:  # a server error must not end the conversation
            history.pop()
            say(f"\n(error: {e})")
            continue
        finally:
            pieces.close()
        say("")
        history.append(Message("assistant", reply.strip()))
