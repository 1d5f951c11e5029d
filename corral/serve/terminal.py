"""Terminal chat: a multi-turn conversation streamed from a local model or any OpenAI-compatible server.

Commands: /reset, /system TEXT, /save FILE (ShareGPT JSON), /help, /exit. Ctrl-C while a reply
streams stops that reply (the part shown is kept); Ctrl-C or Ctrl-D at the prompt leaves.

A reply streams as plain text, as it comes. On a terminal, a finished reply that has Markdown in it
(code, lists, tables, headings, emphasis, links) is then drawn again in place, rendered by rich; a
plain reply is left as it streamed (its render would look the same), and so is one taller than the
screen (its top has scrolled away and cannot be redrawn). Tool calls the model writes in its
template's format are shown as calls, with their arguments; the chat never runs them. Output that is
not a terminal (a pipe, a file) gets the plain text only.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import TextIO

from corral.atomic import atomic_write_text
from corral.chat.conversation import Conversation, Message, ToolCall
from corral.generate.sampling import SamplingParams
from corral.serve.backends import ChatBackend

HELP = """commands:
  /reset          start a new conversation (keeps the system prompt)
  /system TEXT    set the system prompt (empty TEXT removes it) and start over
  /save FILE      write the conversation as ShareGPT JSON
  /help           this text
  /exit           leave (also Ctrl-D)"""


# Markdown worth rendering: a fence, heading, quote, list item or table row at a line start; bold, inline
# code or a link anywhere.
MARKDOWN = re.compile(r"(?m)^ {0,3}(```|~~~|#{1,6} |> |[-*+] |\d{1,9}[.)] |\|.*\|)|\*\*\S|__\S|`[^`\n]+`|\[[^\]\n]+\]\(\S+\)")


def is_terminal(out: TextIO) -> bool:
    return bool(getattr(out, "isatty", lambda: False)()) and os.environ.get("TERM") != "dumb"


def screen_rows(text: str, width: int) -> int:
    """How many terminal rows `text`, written from the start of a row, takes at `width` columns."""
    from rich.cells import cell_len

    return sum(max(1, -(-cell_len(line.expandtabs(8)) // width)) for line in text.split("\n"))


def show_reply(out: TextIO, streamed: str, calls: list[ToolCall], content: str) -> None:
    """After a reply streamed as plain text (the cursor at its end): on a terminal, draw it again as
    Markdown where that changes how it looks, and show its tool calls; elsewhere, list the calls plainly."""
    if not is_terminal(out):
        for call in calls:
            out.write(f"\n[tool call] {call.name} {json.dumps(call.arguments, ensure_ascii=False)}")
        if calls:
            out.write("\n(the chat does not run tools)")
        return
    from rich.console import Console
    from rich.json import JSON
    from rich.markdown import Markdown
    from rich.panel import Panel

    console = Console(file=out, force_terminal=True)
    redraw = bool(calls) or bool(MARKDOWN.search(streamed))
    rows = screen_rows(streamed, console.width)
    if not redraw or rows >= console.height:
        if calls:  # too tall to redraw: the calls go below the text
            out.write("\n")
            for call in calls:
                console.print(Panel(JSON.from_data(call.arguments), title=f"tool call: {call.name}", title_align="left"))
        return
    out.write("\r" + (f"\x1b[{rows - 1}A" if rows > 1 else "") + "\x1b[J")  # back to the reply's first row, clear
    if content.strip():
        console.print(Markdown(content))
    for call in calls:
        console.print(Panel(JSON.from_data(call.arguments), title=f"tool call: {call.name}", title_align="left",
                            subtitle="not run: the chat does not execute tools", subtitle_align="left"))
    out.write("\x1b[1A")  # the caller ends the reply with a newline of its own


def reply_calls(backend: ChatBackend, reply: str) -> tuple[str, list[ToolCall]]:
    """The reply's text and the tool calls in it, read in the local model's template's format (a server's
    replies carry no calls here: the chat sends no tools)."""
    template = getattr(backend, "template", None)
    if template is None:
        return reply, []
    from corral.chat.tools import parse_tool_calls

    parsed = parse_tool_calls(template, reply)
    return (parsed.content, parsed.calls) if parsed.calls else (reply, [])


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
        reply, shown = "", ""
        pieces = backend.stream(Conversation(messages()), params)
        try:
            for piece in pieces:
                reply += piece
                out.write(piece)
                out.flush()
            shown = reply
        except KeyboardInterrupt:
            out.write(" [stopped]")
            shown = reply + " [stopped]"
        except Exception as e:  # a server error must not end the conversation
            history.pop()
            say(f"\n(error: {e})")
            continue
        finally:
            pieces.close()
        content, calls = reply_calls(backend, reply)
        show_reply(out, shown, calls, content + shown[len(reply) :])
        say("")
        history.append(Message("assistant", reply.strip()))
