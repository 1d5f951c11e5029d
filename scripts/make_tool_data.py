"""Build corral/data/builtin/tools_train.jsonl and tools_test.jsonl: tool-use conversations (deterministic).

Four small tools are real Python functions here, and every tool message in the data is what the function
returns for the call before it, so a model trained on the data learns calls whose results are true. The
records are OpenAI chat messages with the conversation's `tools` (OpenAI function definitions):

    {"id": "tools-train-0001", "tools": [{"type": "function", "function": {...}}, ...],
     "messages": [{"role": "user", "content": "What's the weather like in Lisbon?"},
                  {"role": "assistant", "content": "", "tool_calls": [{"id": "call_...", "type": "function",
                   "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Lisbon\\"}"}}]},
                  {"role": "tool", "tool_call_id": "call_...", "name": "get_weather", "content": "{...}"},
                  {"role": "assistant", "content": "It is 18 °C in Lisbon, cloudy."}]}

The cases: one call and an answer from its result; no call needed (greetings, general knowledge,
questions about the tools); a needed tool that is not offered; two calls in sequence (weather then a
conversion, a conversion then arithmetic); two calls in one turn (parallel); a follow-up question that
needs a second call. Each conversation offers all four tools or a shuffled subset that holds the ones
it needs. The test set is held out by phrasing and by value: its user messages come from templates the
training set never uses, its cities are cities training never mentions, and its numbers are drawn apart.

    python scripts/make_tool_data.py              # the shipped files (seed 0: 200 train, 48 test)
    python scripts/make_tool_data.py --seed 1 --train 20 --test 8 --out /tmp/tools
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import random
from pathlib import Path

BUILTIN = Path(__file__).resolve().parents[1] / "corral" / "data" / "builtin"

# ---------------------------------------------------------------------------------------------
# The tools: definitions (what the model is shown) and implementations (what produced the data)

TOOLS = {
    "calculator": {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression (+, -, *, /, ** and parentheses).",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string", "description": "The expression, e.g. 12 * (3 + 4)"}},
                "required": ["expression"],
            },
        },
    },
    "convert_units": {
        "type": "function",
        "function": {
            "name": "convert_units",
            "description": "Convert a quantity between units of length, mass, volume or temperature.",
            "parameters": {
                "type": "object",
                "properties": {
                    "value": {"type": "number", "description": "The quantity to convert"},
                    "from_unit": {"type": "string", "description": "Unit of the value",
                                  "enum": ["km", "mi", "m", "ft", "cm", "in", "kg", "lb", "l", "gal", "C", "F"]},
                    "to_unit": {"type": "string", "description": "Unit to convert to",
                                "enum": ["km", "mi", "m", "ft", "cm", "in", "kg", "lb", "l", "gal", "C", "F"]},
                },
                "required": ["value", "from_unit", "to_unit"],
            },
        },
    },
    "get_weather": {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city: temperature in Celsius, conditions and humidity.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name, e.g. Lisbon"}},
                "required": ["city"],
            },
        },
    },
    "get_time_zone": {
        "type": "function",
        "function": {
            "name": "get_time_zone",
            "description": "The time zone of a city and its standard offset from UTC.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name, e.g. Tokyo"}},
                "required": ["city"],
            },
        },
    },
}
SHORT = {"calculator": "arithmetic", "convert_units": "unit conversions", "get_weather": "the current weather",
         "get_time_zone": "time zones"}

# Invented, fixed weather (not real observations) and the cities' real time zones with standard offsets.
# The last six cities appear only in the test set.
CITIES = {
    "Lisbon": (18, "cloudy", 72, "Europe/Lisbon", "UTC+00:00"),
    "Paris": (14, "light rain", 81, "Europe/Paris", "UTC+01:00"),
    "Tokyo": (22, "sunny", 55, "Asia/Tokyo", "UTC+09:00"),
    "New York": (9, "windy", 48, "America/New_York", "UTC-05:00"),
    "Cairo": (31, "sunny", 20, "Africa/Cairo", "UTC+02:00"),
    "Sydney": (25, "partly cloudy", 60, "Australia/Sydney", "UTC+10:00"),
    "Berlin": (7, "overcast", 77, "Europe/Berlin", "UTC+01:00"),
    "Madrid": (21, "clear", 35, "Europe/Madrid", "UTC+01:00"),
    "Mumbai": (33, "humid", 84, "Asia/Kolkata", "UTC+05:30"),
    "Toronto": (-3, "snow", 70, "America/Toronto", "UTC-05:00"),
    "London": (11, "drizzle", 88, "Europe/London", "UTC+00:00"),
    "Rome": (19, "sunny", 52, "Europe/Rome", "UTC+01:00"),
    "Oslo": (-1, "light snow", 80, "Europe/Oslo", "UTC+01:00"),
    "Nairobi": (24, "partly cloudy", 58, "Africa/Nairobi", "UTC+03:00"),
    "Mexico City": (20, "hazy", 40, "America/Mexico_City", "UTC-06:00"),
    "Seoul": (5, "clear", 45, "Asia/Seoul", "UTC+09:00"),
    "Buenos Aires": (27, "thunderstorms", 75, "America/Argentina/Buenos_Aires", "UTC-03:00"),
    "Reykjavik": (2, "windy", 79, "Atlantic/Reykjavik", "UTC+00:00"),
    "Singapore": (30, "showers", 86, "Asia/Singapore", "UTC+08:00"),
    "Vancouver": (8, "rain", 90, "America/Vancouver", "UTC-08:00"),
    # held out: only in the test set
    "Athens": (23, "sunny", 44, "Europe/Athens", "UTC+02:00"),
    "Lima": (17, "overcast", 83, "America/Lima", "UTC-05:00"),
    "Helsinki": (-4, "snow", 85, "Europe/Helsinki", "UTC+02:00"),
    "Bangkok": (34, "humid", 78, "Asia/Bangkok", "UTC+07:00"),
    "Dublin": (10, "showers", 87, "Europe/Dublin", "UTC+00:00"),
    "Cape Town": (26, "windy", 50, "Africa/Johannesburg", "UTC+02:00"),
}
TEST_CITIES = ["Athens", "Lima", "Helsinki", "Bangkok", "Dublin", "Cape Town"]
TRAIN_CITIES = [c for c in CITIES if c not in TEST_CITIES]

# unit -> (dimension, factor to the dimension's base unit); temperatures are converted by formula.
UNITS = {"km": ("length", 1000.0), "mi": ("length", 1609.344), "m": ("length", 1.0), "ft": ("length", 0.3048),
         "cm": ("length", 0.01), "in": ("length", 0.0254), "kg": ("mass", 1.0), "lb": ("mass", 0.45359237),
         "l": ("volume", 1.0), "gal": ("volume", 3.785411784), "C": ("temperature", 1.0), "F": ("temperature", 1.0)}
UNIT_PAIRS = [("km", "mi"), ("mi", "km"), ("m", "ft"), ("ft", "m"), ("cm", "in"), ("in", "cm"), ("kg", "lb"),
              ("lb", "kg"), ("l", "gal"), ("gal", "l"), ("C", "F"), ("F", "C")]
UNIT_WORDS = {"km": ["kilometers", "km", "kilometres"], "mi": ["miles", "mi"], "m": ["meters", "metres", "m"],
              "ft": ["feet", "ft"], "cm": ["centimeters", "cm"], "in": ["inches", "in"],
              "kg": ["kilograms", "kg", "kilos"], "lb": ["pounds", "lbs", "lb"], "l": ["liters", "litres", "L"],
              "gal": ["gallons", "gal"], "C": ["Celsius", "°C", "degrees Celsius"],
              "F": ["Fahrenheit", "°F", "degrees Fahrenheit"]}
UNIT_SHOWN = {"km": "km", "mi": "miles", "m": "m", "ft": "feet", "cm": "cm", "in": "inches", "kg": "kg",
              "lb": "lb", "l": "liters", "gal": "gallons", "C": "°C", "F": "°F"}

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Mod: operator.mod, ast.Pow: operator.pow}


def tidy(x: float) -> int | float:
    """A result as the data shows it: an integer when whole, else rounded to 2 decimals."""
    x = round(float(x), 2)
    return int(x) if x == int(x) else x


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 12:
            raise ValueError("exponent too large")
        return _BINARY[type(node.op)](left, right)
    raise ValueError("only numbers, + - * / % ** and parentheses are allowed")


def calculator(expression: str) -> dict:
    """Arithmetic on numbers only: the expression is parsed, never eval'd, and anything but numbers and
    the listed operators is refused."""
    try:
        return {"result": tidy(_evaluate(ast.parse(expression, mode="eval")))}
    except ZeroDivisionError:
        return {"error": "division by zero"}
    except (SyntaxError, ValueError, TypeError) as e:
        return {"error": f"cannot evaluate {expression!r}: {e}"}


def convert_units(value: float, from_unit: str, to_unit: str) -> dict:
    if from_unit not in UNITS or to_unit not in UNITS or UNITS[from_unit][0] != UNITS[to_unit][0]:
        return {"error": f"cannot convert {from_unit} to {to_unit}"}
    if UNITS[from_unit][0] == "temperature":
        celsius = value if from_unit == "C" else (value - 32) * 5 / 9
        result = celsius if to_unit == "C" else celsius * 9 / 5 + 32
    else:
        result = value * UNITS[from_unit][1] / UNITS[to_unit][1]
    return {"result": tidy(result), "unit": to_unit}


def get_weather(city: str) -> dict:
    found = next((name for name in CITIES if name.lower() == city.strip().lower()), None)
    if found is None:
        return {"error": f"no weather data for {city}"}
    temperature, condition, humidity = CITIES[found][:3]
    return {"temperature_c": temperature, "condition": condition, "humidity": humidity, "city": found}


def get_time_zone(city: str) -> dict:
    found = next((name for name in CITIES if name.lower() == city.strip().lower()), None)
    if found is None:
        return {"error": f"no time zone data for {city}"}
    return {"utc_offset": CITIES[found][4], "time_zone": CITIES[found][3], "city": found}


FUNCTIONS = {"calculator": calculator, "convert_units": convert_units, "get_weather": get_weather,
             "get_time_zone": get_time_zone}


def run_tool(name: str, arguments: dict) -> str:
    """The tool message's content for a call, as the data holds it."""
    return json.dumps(FUNCTIONS[name](**arguments), ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Phrasings: each kind has training templates and held-out test templates (never used in training)

PHRASES = {
    "weather": {
        "train": ["What's the weather like in {city}?", "How's the weather in {city} today?",
                  "Tell me the current weather in {city}.", "weather in {city}", "Can you check the weather in {city} for me?",
                  "What's the temperature in {city}?", "I'm heading to {city}. What's the weather there?",
                  "Do I need a jacket in {city} today?", "Give me the weather report for {city}.",
                  "How hot is it in {city}?", "What are the conditions in {city} at the moment?",
                  "Is it raining in {city}?", "Check {city}'s weather, please."],
        "test": ["Could you look up the weather for {city}?", "Current conditions in {city}, please.",
                 "What's it like outside in {city}?", "I'd like to know today's weather in {city}.",
                 "How cold or warm is {city} at the moment?"],
    },
    "time_zone": {
        "train": ["What time zone is {city} in?", "Which time zone does {city} use?", "time zone of {city}",
                  "What's the UTC offset of {city}?", "I have a call with someone in {city}. What's their time zone?",
                  "Tell me {city}'s time zone.", "How far from UTC is {city}?", "Look up the time zone for {city}.",
                  "Which UTC offset applies in {city}?", "What is the standard time offset in {city}?"],
        "test": ["Can you find out the time zone of {city}?", "In which time zone is {city}?",
                 "What's the offset from UTC in {city}, please?", "I need {city}'s time zone."],
    },
    "convert": {
        "train": ["Convert {value} {src} to {dst}.", "How many {dst} is {value} {src}?", "What is {value} {src} in {dst}?",
                  "{value} {src} to {dst}", "Can you convert {value} {src} into {dst}?", "I have {value} {src}. How much is that in {dst}?",
                  "Please change {value} {src} to {dst}.", "What's {value} {src} expressed in {dst}?",
                  "How much is {value} {src} in {dst}?", "Turn {value} {src} into {dst} for me."],
        "test": ["Could you tell me what {value} {src} comes to in {dst}?", "Express {value} {src} in {dst}, please.",
                 "I need {value} {src} converted to {dst}.", "What do {value} {src} equal in {dst}?"],
    },
    "calc": {
        "train": ["What is {expr}?", "Calculate {expr}.", "Compute {expr}.", "Can you work out {expr}?", "{expr} = ?",
                  "What's {expr}?", "Please calculate {expr} for me.", "How much is {expr}?", "Solve {expr}.",
                  "Help me with some math: {expr}"],
        "test": ["Please evaluate {expr}.", "I need the result of {expr}.", "Quick math: what does {expr} give?",
                 "Could you figure out {expr}?"],
    },
    "weather_f": {
        "train": ["What's the weather in {city} in Fahrenheit?", "How warm is it in {city}, in degrees Fahrenheit?",
                  "Tell me the temperature in {city} in °F.", "I think in Fahrenheit. What's the weather in {city}?",
                  "Weather in {city}, but give me the temperature in Fahrenheit."],
        "test": ["Can you get me {city}'s current temperature in Fahrenheit?",
                 "What's it like in {city} right now? Use Fahrenheit, please."],
    },
    "run_week": {
        "train": ["I run {value} km every day. How many miles is that in a week?",
                  "If I walk {value} km a day, how many miles do I walk in 7 days?",
                  "My daily commute is {value} km. How many miles is that over a 7-day week?"],
        "test": ["I cycle {value} km daily. What's my weekly distance in miles?"],
    },
    "weather_two": {
        "train": ["What's the weather in {city} and {city2}?", "Compare the weather in {city} and {city2}.",
                  "How's the weather in {city} and in {city2} today?", "Weather for {city} and {city2}, please."],
        "test": ["Could you check both {city} and {city2} for current weather?",
                 "I'm choosing between {city} and {city2}. What's the weather in each?"],
    },
    "time_zone_two": {
        "train": ["What time zones are {city} and {city2} in?", "Which time zones do {city} and {city2} use?",
                  "Give me the UTC offsets of {city} and {city2}."],
        "test": ["I have colleagues in {city} and {city2}. What are their time zones?"],
    },
    "convert_two": {
        "train": ["Convert {value} {src} to {dst} and {value2} {src2} to {dst2}.",
                  "How much is {value} {src} in {dst}, and {value2} {src2} in {dst2}?"],
        "test": ["Two conversions please: {value} {src} into {dst}, then {value2} {src2} into {dst2}."],
    },
    "followup_f": {
        "train": ["And in Fahrenheit?", "What's that in Fahrenheit?", "Can you give me that in °F?"],
        "test": ["How much is that in degrees Fahrenheit?"],
    },
    "followup_city": {
        "train": ["And what about {city2}?", "How about {city2}?", "Same question for {city2}."],
        "test": ["Now do {city2}, please."],
    },
}

SMALL_TALK = {
    "train": [("Hi!", "Hello! How can I help you today?"),
              ("Hello there.", "Hello! What can I do for you?"),
              ("Good morning!", "Good morning! How can I help?"),
              ("Hey, how are you?", "I'm doing well, thanks for asking. How can I help you?"),
              ("Thanks, that's all.", "You're welcome! Have a great day."),
              ("Thank you!", "You're welcome!"),
              ("Who are you?", "I'm a helpful assistant. I can answer questions and use tools when they help."),
              ("What is the capital of France?", "The capital of France is Paris."),
              ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
              ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
              ("How many continents are there?", "There are seven continents."),
              ("What does DNA stand for?", "DNA stands for deoxyribonucleic acid."),
              ("Give me a synonym for happy.", "A synonym for happy is cheerful."),
              ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
              ("Tell me a fun fact.", "Octopuses have three hearts."),
              ("What is photosynthesis?", "Photosynthesis is how plants use sunlight, water and carbon dioxide to make "
               "sugar and release oxygen."),
              ("Can you write a haiku about rain?", "Soft rain on the roof,\nthe garden drinks in silence,\n"
               "puddles hold the sky."),
              ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.")],
    "test": [("Good evening!", "Good evening! How can I help you?"),
             ("Hiya, anyone there?", "Yes, I'm here! How can I help?"),
             ("Cheers for the help.", "You're welcome! Happy to help."),
             ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
             ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
             ("How many legs does a spider have?", "A spider has eight legs."),
             ("What gas do humans breathe out?", "Humans breathe out carbon dioxide."),
             ("Suggest a name for a pet goldfish.", "How about Bubbles?")],
}
ABOUT_TOOLS = {
    "train": ["What tools can you use?", "What can you do?", "Which tools do you have?", "What are your tools for?",
              "Do you have any tools?"],
    "test": ["Which functions do you have access to?", "List the tools you have, please."],
}
CANNOT = "I can't {task}: I don't have a tool for that here. I can help with {have}."
TASKS = {"weather": ("check the weather", "get_weather"), "time_zone": ("look up time zones", "get_time_zone"),
         "convert": ("convert units", "convert_units"), "calc": ("use a calculator", "calculator")}

# How many of each case per 100 conversations (the same mix in both splits).
MIX = {"weather": 13, "time_zone": 11, "convert": 12, "calc": 12, "small_talk": 11, "about_tools": 5,
       "not_offered": 5, "weather_f": 7, "run_week": 4, "weather_two": 5, "time_zone_two": 3, "convert_two": 3,
       "followup_f": 5, "followup_city": 4}


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class Builder:
    """One split's conversations: its own random stream, templates, cities and number ranges."""

    def __init__(self, split: str, seed: int):
        self.split = split
        self.rng = random.Random(f"{seed}-{split}")
        self.cities = TEST_CITIES if split == "test" else TRAIN_CITIES

    def phrase(self, kind: str, **values) -> str:
        return self.rng.choice(PHRASES[kind][self.split]).format(**values)

    def call_id(self) -> str:
        return f"call_{self.rng.getrandbits(48):012x}"

    def tools(self, needed: list[str], exclude: str = "") -> list[dict]:
        """All four tools (a third of the time) or a shuffled subset holding the needed ones, never `exclude`.
        Subsets keep prompts short (each definition is about 100 tokens) and teach the model to read the list."""
        names = [n for n in TOOLS if n != exclude]
        if not exclude and self.rng.random() < 0.33:
            chosen = names
        else:
            extra = [n for n in names if n not in needed]
            chosen = needed + self.rng.sample(extra, self.rng.randint(0 if needed else 1, len(extra)))
        self.rng.shuffle(chosen)
        return [TOOLS[n] for n in chosen]

    def calls(self, *calls: tuple[str, dict]) -> list[dict]:
        """An assistant turn making `calls` and the tool messages with their results."""
        made = [(self.call_id(), name, args) for name, args in calls]
        messages = [{"role": "assistant", "content": "", "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
            for cid, name, args in made]}]
        messages += [{"role": "tool", "tool_call_id": cid, "name": name, "content": run_tool(name, args)}
                     for cid, name, args in made]
        return messages

    # values -------------------------------------------------------------------------------

    def city(self, but: str = "") -> str:
        return self.rng.choice([c for c in self.cities if c != but])

    def quantity(self, unit: str) -> int | float:
        """Training values are whole numbers below 100 or halves; test values 100-999 or tenths (never .0 or
        .5), so no test quantity is a training one."""
        if unit in ("C", "F"):
            return self.rng.randint(-10, 40) if self.split == "train" else self.rng.choice([-25, -18, 45, 55, 75, 90, 104])
        if self.split == "train":
            return self.rng.choice([self.rng.randint(1, 99), self.rng.randint(1, 40) + 0.5])
        tenths = self.rng.choice([1, 2, 3, 4, 6, 7, 8, 9]) / 10
        return self.rng.choice([self.rng.randint(100, 999), round(self.rng.randint(1, 9) + tenths, 1)])

    def expression(self) -> str:
        r = self.rng.randint
        lo, hi = (2, 99) if self.split == "train" else (101, 999)
        a, b, c = r(lo, hi), r(lo, hi), r(2, 9)
        shapes = [f"{a} * {b}", f"{a} + {b}", f"{a} - {b}", f"{a * c} / {c}", f"({a} + {b}) * {c}",
                  f"{a} * {c} - {b}", f"{a} ** 2", f"{a} / {c}"]
        return self.rng.choice(shapes)

    def conversion(self) -> tuple[str, str, int | float, str]:
        src, dst = self.rng.choice(UNIT_PAIRS)
        value = self.quantity(src)
        return src, dst, value, self.rng.choice(UNIT_WORDS[src]) + "|" + self.rng.choice(UNIT_WORDS[dst])

    # answers ------------------------------------------------------------------------------

    def weather_answer(self, city: str) -> str:
        w = get_weather(city)
        return self.rng.choice([
            "It is {t} °C in {city}, {c}.", "Right now it's {t} °C and {c} in {city}.",
            "In {city} it is {t} °C and {c}, with {h}% humidity.", "{city}: {t} °C, {c}, humidity {h}%.",
        ]).format(t=w["temperature_c"], c=w["condition"], h=w["humidity"], city=city)

    def time_zone_answer(self, city: str) -> str:
        z = get_time_zone(city)
        return self.rng.choice(["{city} is on {o} ({z}).", "{city} uses the {z} time zone, {o}.",
                                "The time zone of {city} is {z}, which is {o} in standard time."]
                               ).format(city=city, o=z["utc_offset"], z=z["time_zone"])

    @staticmethod
    def convert_answer(value, src, dst) -> str:
        result = convert_units(value, src, dst)["result"]
        return f"{value} {UNIT_SHOWN[src]} is {result} {UNIT_SHOWN[dst]}."

    # cases --------------------------------------------------------------------------------

    def case(self, kind: str) -> tuple[list[str], list[dict]]:
        """The tools the case needs and its messages."""
        say = lambda text: {"role": "user", "content": text}  # noqa: E731
        reply = lambda text: {"role": "assistant", "content": text}  # noqa: E731
        if kind == "weather":
            city = self.city()
            return ["get_weather"], [say(self.phrase(kind, city=city)), *self.calls(("get_weather", {"city": city})),
                                     reply(self.weather_answer(city))]
        if kind == "time_zone":
            city = self.city()
            return ["get_time_zone"], [say(self.phrase(kind, city=city)),
                                       *self.calls(("get_time_zone", {"city": city})), reply(self.time_zone_answer(city))]
        if kind == "convert":
            src, dst, value, words = self.conversion()
            w_src, w_dst = words.split("|")
            return ["convert_units"], [
                say(self.phrase(kind, value=value, src=w_src, dst=w_dst)),
                *self.calls(("convert_units", {"value": value, "from_unit": src, "to_unit": dst})),
                reply(self.convert_answer(value, src, dst))]
        if kind == "calc":
            expr = self.expression()
            result = calculator(expr)["result"]
            return ["calculator"], [say(self.phrase(kind, expr=expr)), *self.calls(("calculator", {"expression": expr})),
                                    reply(self.rng.choice([f"{expr} = {result}.", f"The result is {result}.",
                                                           f"{expr} is {result}."]))]
        if kind == "small_talk":
            question, answer = self.rng.choice(SMALL_TALK[self.split])
            return [], [say(question), reply(answer)]
        if kind == "about_tools":
            return ["__about__"], [say(self.rng.choice(ABOUT_TOOLS[self.split]))]  # the reply names the offered tools
        if kind == "not_offered":
            task = self.rng.choice(sorted(TASKS))
            city = self.city()
            src, dst, value, words = self.conversion()
            question = self.phrase(task, city=city, expr=self.expression(), value=value, src=words.split("|")[0],
                                   dst=words.split("|")[1])
            return ["__missing__" + TASKS[task][1]], [say(question)]
        if kind == "weather_f":
            city = self.city()
            t = get_weather(city)["temperature_c"]
            f = convert_units(t, "C", "F")["result"]
            return ["get_weather", "convert_units"], [
                say(self.phrase(kind, city=city)), *self.calls(("get_weather", {"city": city})),
                *self.calls(("convert_units", {"value": t, "from_unit": "C", "to_unit": "F"})),
                reply(f"It is {f} °F ({t} °C) in {city}, {get_weather(city)['condition']}.")]
        if kind == "run_week":
            value = self.rng.randint(2, 15) if self.split == "train" else self.rng.randint(16, 40)
            miles = convert_units(value, "km", "mi")["result"]
            week = calculator(f"{miles} * 7")["result"]
            return ["convert_units", "calculator"], [
                say(self.phrase(kind, value=value)),
                *self.calls(("convert_units", {"value": value, "from_unit": "km", "to_unit": "mi"})),
                *self.calls(("calculator", {"expression": f"{miles} * 7"})),
                reply(f"{value} km is {miles} miles, so in a week that is {week} miles.")]
        if kind == "weather_two":
            city = self.city()
            city2 = self.city(but=city)
            return ["get_weather"], [
                say(self.phrase(kind, city=city, city2=city2)),
                *self.calls(("get_weather", {"city": city}), ("get_weather", {"city": city2})),
                reply(self.weather_answer(city) + " " + self.weather_answer(city2))]
        if kind == "time_zone_two":
            city = self.city()
            city2 = self.city(but=city)
            return ["get_time_zone"], [
                say(self.phrase(kind, city=city, city2=city2)),
                *self.calls(("get_time_zone", {"city": city}), ("get_time_zone", {"city": city2})),
                reply(self.time_zone_answer(city) + " " + self.time_zone_answer(city2))]
        if kind == "convert_two":
            (src, dst, value, words), (src2, dst2, value2, words2) = self.conversion(), self.conversion()
            return ["convert_units"], [
                say(self.phrase(kind, value=value, src=words.split("|")[0], dst=words.split("|")[1], value2=value2,
                                src2=words2.split("|")[0], dst2=words2.split("|")[1])),
                *self.calls(("convert_units", {"value": value, "from_unit": src, "to_unit": dst}),
                            ("convert_units", {"value": value2, "from_unit": src2, "to_unit": dst2})),
                reply(self.convert_answer(value, src, dst) + " " + self.convert_answer(value2, src2, dst2))]
        if kind == "followup_f":
            city = self.city()
            t = get_weather(city)["temperature_c"]
            f = convert_units(t, "C", "F")["result"]
            return ["get_weather", "convert_units"], [
                say(self.phrase("weather", city=city)), *self.calls(("get_weather", {"city": city})),
                reply(self.weather_answer(city)), say(self.phrase(kind)),
                *self.calls(("convert_units", {"value": t, "from_unit": "C", "to_unit": "F"})),
                reply(f"{t} °C is {f} °F.")]
        if kind == "followup_city":
            city = self.city()
            city2 = self.city(but=city)
            first = self.rng.choice(["weather", "time_zone"])
            tool = "get_weather" if first == "weather" else "get_time_zone"
            answer = self.weather_answer if first == "weather" else self.time_zone_answer
            return [tool], [say(self.phrase(first, city=city)), *self.calls((tool, {"city": city})), reply(answer(city)),
                            say(self.phrase(kind, city2=city2)), *self.calls((tool, {"city": city2})),
                            reply(answer(city2))]
        raise ValueError(kind)

    def conversation(self, index: int, kind: str) -> dict:
        needed, messages = self.case(kind)
        if needed and needed[0] == "__about__":
            tools = self.tools([])
            names = [t["function"]["name"] for t in tools]
            messages.append({"role": "assistant", "content": "I can use these tools: " + _join(
                [f"{n} ({SHORT[n]})" for n in names]) + ". Ask me anything and I'll use them when they help."})
        elif needed and needed[0].startswith("__missing__"):
            missing = needed[0][len("__missing__"):]
            tools = self.tools([], exclude=missing)
            task = next(t for t, (_, tool) in TASKS.items() if tool == missing)
            messages.append({"role": "assistant", "content": CANNOT.format(
                task=TASKS[task][0], have=_join([SHORT[t["function"]["name"]] for t in tools]))})
        else:
            tools = self.tools(needed)
        return {"id": f"tools-{self.split}-{index:04d}", "tools": tools, "messages": messages}


def make_records(split: str, count: int, seed: int = 0) -> list[dict]:
    """`count` conversations of `split` ("train" or "test") with MIX's proportions, in a seeded order."""
    builder = Builder(split, seed)
    total = sum(MIX.values())
    kinds = [kind for kind, share in MIX.items() for _ in range(round(share * count / total))]
    kinds = (kinds + list(MIX))[:count] if len(kinds) < count else kinds[:count]
    builder.rng.shuffle(kinds)
    return [builder.conversation(i + 1, kind) for i, kind in enumerate(kinds)]


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=200, help="training conversations")
    parser.add_argument("--test", type=int, default=48, help="held-out test conversations")
    parser.add_argument("--out", type=Path, default=BUILTIN, help="folder for tools_train.jsonl and tools_test.jsonl")
    args = parser.parse_args()
    from corral.atomic import atomic_write_text

    for split, count in (("train", args.train), ("test", args.test)):
        path = atomic_write_text(args.out / f"tools_{split}.jsonl", to_jsonl(make_records(split, count, args.seed)))
        print(f"wrote {count} conversations to {path}")


if __name__ == "__main__":
    main()
