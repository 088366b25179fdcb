"""A prompt corpus for draft-model training, built by the project itself, offline and deterministically.

A drafter learns the target's continuations of *prompts*, so the prompts must look like what the deployment will
see: chat questions, writing requests, code to write or edit, word problems, passages to summarise. Nothing here is
downloaded. Prompts come from two kinds of source:

  * `template`: instruction templates crossed with topics written below, plus generated word problems (numbers
    drawn from a seeded RNG), letters, code tasks and paragraphs to edit (some with generated typos);
  * `passage`: freely licensed text already on the machine, each paired with one passage instruction: docstrings
    and short function sources of a fixed list of Python standard library modules (PSF licence), and, where the
    Debian `python3-doc` package is installed, paragraphs of its HTML manual.

`self_instruct_requests` / `clean_self_instruct` add a third source ("self-instruct"): the target writes questions
about topics, which `training/data.py` then has the target answer.

Benchmark prompts (`bench/prompts/*.jsonl`) and the held-out prompts the shipped drafters are evaluated on
(`workers/drafters/checkpoints/*/heldout-*.jsonl`) are evaluation data and are excluded by normalised text, so a
drafter is never trained on the prompts it is measured on.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import random
import re
import warnings
from collections.abc import Iterable
from html.parser import HTMLParser
from pathlib import Path

BENCH_PROMPTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "prompts"
SHIPPED_HELDOUT_GLOB = "workers/drafters/checkpoints/*/heldout-*.jsonl"  # relative to the repository root
PYTHON_DOC_GLOB = "/usr/share/doc/python3*/html"
PASSAGE_CHARS = (200, 1200)
DEFAULT_SOURCES = ("template", "passage")

# Share of each pool in a capped corpus (`build_prompts(n=...)`); a short pool leaves its share to the others.
POOL_WEIGHTS = {"topic": 0.40, "code": 0.11, "math": 0.10, "edit": 0.10, "letter": 0.05, "passage": 0.24}

# ------------------------------------------------------------------------------------------------------- topics
# category -> (topics, templates that fit that category); every topic also takes every GENERIC template.
# Topics are written so that "{t}" reads naturally in the category's templates (gerunds for activities,
# nouns for concepts, dishes for cooking, places for travel).

GENERIC = [
    "Explain {t} to a beginner.",
    "Give me five interesting facts about {t}.",
    "What are some common misconceptions about {t}?",
    "Write a short poem about {t}.",
    "Write a haiku about {t}.",
    "Write a short story of about 150 words in which {t} plays a part.",
    "Summarize the most important things to know about {t} in three sentences.",
    "Write five quiz questions about {t}, with the answers at the end.",
    "Explain {t} using an everyday analogy.",
    "Write the opening paragraph of a blog post about {t}.",
    "I want to learn more about {t}. What five questions should I start with?",
    "Write a short dialogue between two friends talking about {t}.",
    "Make a glossary of five key terms related to {t}, with a one-line definition for each.",
]

ACTIVITY = [
    "Give me practical tips for {t}.",
    "What mistakes do people often make when {t}?",
    "What are the pros and cons of {t}?",
    "Give step-by-step instructions for {t}.",
    "Make a simple one-week plan for {t}.",
    "Write a short encouraging message for a friend who is {t}.",
]

CONCEPT = [
    "How does {t} work?",
    "Why does {t} matter in everyday life?",
    "What are the key ideas behind {t}?",
    "Compare {t} with a related idea and explain the difference.",
    "How did our understanding of {t} develop over time?",
]

ACTIVITY_TOPICS = {
    "everyday life": """
        getting up early; keeping a small flat tidy; doing laundry without shrinking clothes; organising a garage;
        planning a birthday party; moving to a new city; living with a roommate; decluttering a wardrobe;
        hosting a dinner for friends; caring for houseplants; looking after a new puppy; training a cat to use a
        scratching post; painting a bedroom; hanging pictures on a wall; fixing a dripping tap; reducing food waste
        at home; choosing a mattress; packing for a house move; making friends as an adult; writing a to-do list
        that works; keeping a journal; planning a weekly menu; babysitting a toddler; cleaning an oven;
        setting up a home office; getting ready for winter; choosing a gift for a grandparent""",
    "health": """
        getting better sleep; drinking enough water; starting to run; stretching after exercise; eating more
        vegetables; cutting down on sugar; managing stress at work; taking a break from screens; improving posture
        at a desk; recovering from a cold; learning to meditate; walking ten thousand steps a day; cooking healthy
        meals on a budget; preparing for a first marathon; building a morning routine; keeping teeth healthy;
        looking after your eyes when using a computer; staying active during a long commute; quitting coffee;
        lifting weights safely; staying cool during a heatwave; protecting skin from the sun""",
    "money": """
        saving money for a holiday; making a monthly budget; paying off a credit card; building an emergency fund;
        saving for retirement; buying a first car; renting a first flat; negotiating a salary; splitting bills
        with housemates; shopping for groceries on a budget; avoiding impulse purchases; starting to invest;
        teaching children about money; comparing phone plans; selling things you no longer need; planning a wedding
        on a small budget; tracking spending with a spreadsheet; saving on energy bills; choosing a bank account""",
    "work and career": """
        preparing for a job interview; writing a CV; asking for a promotion; working from home; running a
        productive meeting; giving feedback to a colleague; changing careers at forty; starting a small business;
        managing a team for the first time; handling a difficult customer; learning to say no at work; preparing a
        presentation; networking at a conference; writing a cover letter; onboarding a new employee; taking notes
        in meetings; dealing with a long commute; returning to work after a break; freelancing as a designer""",
    "education and learning": """
        learning a new language as an adult; studying for an exam; learning to play the guitar; teaching a child to
        read; taking an online course; memorising vocabulary; learning to touch type; writing an essay;
        reading more books; learning to draw; preparing for a maths test; studying in a noisy house; learning to
        code in the evenings; helping a teenager with homework; learning chess; keeping motivated while studying""",
    "hobbies and sports": """
        starting a vegetable garden; learning to swim; taking up photography; knitting a first scarf; starting a
        podcast; birdwatching in a city; going camping for the first time; learning to cook Thai food; building a
        model railway; playing five-a-side football; starting rock climbing; cycling to work; training for a 5 km
        race; learning to juggle; baking sourdough bread; writing a first novel; collecting stamps; playing
        tennis as a beginner; hiking in the mountains; keeping chickens in a back garden; brewing tea properly""",
}

CONCEPT_TOPICS = {
    "science": """
        photosynthesis; the water cycle; gravity; black holes; DNA; vaccines; the immune system; plate tectonics;
        volcanoes; earthquakes; the greenhouse effect; electricity; magnetism; sound waves; the speed of light;
        atoms; chemical reactions; acids and bases; evolution by natural selection; the human heart; the brain;
        antibiotics; the periodic table; the phases of the Moon; tides; rainbows; static electricity; friction;
        nuclear fusion; the Big Bang; climate change; the nitrogen cycle; cells; bacteria; enzymes; the ozone
        layer; renewable energy; solar panels; batteries; the scientific method""",
    "nature and animals": """
        honey bees; migrating birds; octopuses; coral reefs; rainforests; deserts; wolves; elephants; whales;
        ants; butterflies; penguins; mushrooms; hibernation; camouflage in animals; food chains; wetlands;
        the Amazon river; tigers; sharks; owls; bats; dolphins; earthworms; seeds; tree rings""",
    "technology": """
        the internet; search engines; smartphones; GPS; Wi-Fi; cloud computing; electric cars; 3D printing;
        artificial intelligence; robots; passwords; encryption; email; computer viruses; blockchains; QR codes;
        satellites; touch screens; streaming video; wind turbines; microwave ovens; bar codes; virtual reality;
        self-driving cars; data centres; noise-cancelling headphones""",
    "history": """
        the printing press; the Roman Empire; ancient Egypt; the Silk Road; the Industrial Revolution; the Renaissance;
        the invention of writing; the first moon landing; the fall of the Berlin Wall; the Viking age; the Black Death;
        the French Revolution; ancient Greece; the age of exploration; the history of the bicycle; the invention of
        the telephone; the history of chocolate; the history of the Olympic Games; the invention of paper; the
        building of the pyramids; the history of money; the invention of the steam engine; the history of medicine""",
    "programming": """
        recursion; variables; loops; functions; classes and objects; Python lists; Python dictionaries; sets;
        exceptions; unit tests; version control with git; regular expressions; JSON; APIs; HTTP requests; SQL
        joins; indexes in databases; sorting algorithms; binary search; hash tables; linked lists; big O notation;
        type hints in Python; decorators in Python; generators in Python; list comprehensions; virtual environments;
        command-line arguments; reading and writing files; threads; async programming; code reviews; debugging;
        refactoring; logging; caching; immutability; closures; string formatting; environment variables""",
    "society and culture": """
        democracy; taxes; public libraries; recycling; volunteering; museums; jazz music; the Olympic Games;
        street food; public transport; local elections; board games; folk tales; city parks; open source software;
        news media; social media; tea ceremonies; national parks; chess""",
}

HISTORY = [
    "What caused {t}, and what were its consequences?",
    "Write a diary entry by an ordinary person who lived through {t}.",
    "Give a short timeline of {t}.",
]
PROGRAMMING = [
    "Explain {t} with a short Python example.",
    "When should a programmer use {t}, and when should they avoid it?",
    "Write a short tutorial on {t} for someone who knows basic Python.",
    "What bugs are common when working with {t}, and how can they be avoided?",
]
COOKING = [
    "Give me a simple recipe for {t}.",
    "What can go wrong when making {t}, and how do I avoid it?",
    "Suggest three variations of {t}.",
    "How can I make {t} healthier without losing the taste?",
    "Write a shopping list for making {t} for four people.",
    "Describe the taste and texture of {t} to someone who has never had it.",
]
COOKING_TOPICS = """
    a vegetable soup; banana bread; pancakes; a tomato pasta sauce; a green salad; fried rice; a lentil curry;
    chocolate chip cookies; a roast chicken; hummus; guacamole; an omelette; a fruit smoothie; porridge; pizza
    dough; a stir-fry; mashed potatoes; a lemon cake; a chickpea stew; vegetable lasagne; a cheese sandwich;
    apple crumble; chilli con carne; a bean burrito; miso soup; a Greek salad; scrambled eggs; homemade bread;
    a mushroom risotto; carrot cake; iced tea; a curry paste; potato wedges; a berry jam"""
TRAVEL = [
    "Plan a three-day trip to {t}.",
    "What should a first-time visitor to {t} know?",
    "Write a short travel diary entry about a day in {t}.",
    "What local food should I try in {t}?",
    "How could someone visit {t} on a small budget?",
    "Describe {t} to someone who has never been there.",
]
TRAVEL_TOPICS = """
    Lisbon; Kyoto; the Scottish Highlands; Iceland; Rome; New York City; Mexico City; Cape Town; Istanbul;
    Vienna; Bangkok; the Swiss Alps; Buenos Aires; Marrakesh; Sydney; Vancouver; Prague; the Greek islands;
    Seoul; Edinburgh; a small seaside town; a national park; Amsterdam; Barcelona; Cairo; Hanoi; the Norwegian
    fjords; Dublin; Havana; a mountain village"""


def _split(block: str) -> list[str]:
    return [t.strip() for t in block.replace("\n", " ").split(";") if t.strip()]


def topics() -> list[str]:
    """Every topic, in a fixed order (also what self-instruct asks the target about)."""
    out: list[str] = []
    for block in [*ACTIVITY_TOPICS.values(), *CONCEPT_TOPICS.values(), COOKING_TOPICS, TRAVEL_TOPICS]:
        out += _split(block)
    return out


def _topic_prompts() -> list[str]:
    groups = [(_split(b), ACTIVITY) for b in ACTIVITY_TOPICS.values()]
    for name, block in CONCEPT_TOPICS.items():
        extra = {"history": HISTORY, "programming": PROGRAMMING}.get(name, CONCEPT)
        groups.append((_split(block), extra))
    groups += [(_split(COOKING_TOPICS), COOKING), (_split(TRAVEL_TOPICS), TRAVEL)]
    return [tpl.format(t=t) for ts, extra in groups for t in ts for tpl in GENERIC + extra]


# --------------------------------------------------------------------------------------------------------- code

CODE_TASKS = """
    reverses a string; checks whether a number is prime; counts the vowels in a string; returns the largest of three
    numbers; computes the factorial of n; returns the n-th Fibonacci number; removes duplicates from a list while
    keeping order; checks whether a word is a palindrome; converts Celsius to Fahrenheit; merges two sorted lists;
    flattens a nested list; counts how often each word appears in a text; finds the second largest number in a
    list; checks whether two words are anagrams; returns the digits of an integer as a list; computes the average
    of a list of numbers; capitalises the first letter of every word; splits a list into chunks of size n; finds
    the longest word in a sentence; converts a Roman numeral to an integer; converts an integer to binary; checks
    whether a year is a leap year; computes the greatest common divisor of two numbers; rotates a list by k
    positions; transposes a matrix given as a list of lists; validates an email address with a simple rule; reads
    a CSV file and returns the rows as dictionaries; returns the most common element in a list; groups words by
    their first letter; computes the running total of a list; removes punctuation from a string; checks whether
    brackets in a string are balanced; sorts a list of dictionaries by a given key; generates a random password;
    computes simple interest; finds all pairs in a list that add up to a target; compresses a string like
    aaabb into a3b2; returns the intersection of two lists; counts the lines in a text file; converts a dictionary
    to a query string; parses a date in the format YYYY-MM-DD; computes the distance between two points; checks
    whether a list is sorted; returns the indexes of all occurrences of a value; implements binary search;
    implements bubble sort; implements a stack with push and pop; implements a queue using two stacks; caches the
    results of an expensive function; retries a function call up to three times; measures how long a function
    takes; converts snake_case to camelCase; truncates a string to n characters with an ellipsis; finds the
    missing number in a list from 1 to n; sums the even numbers in a list; returns the first non-repeated
    character in a string; checks whether a string contains only digits; counts the words in a file; pads a
    number with leading zeros; renames every file in a folder to lower case; finds duplicate files by size;
    computes a moving average; shuffles a deck of cards; simulates rolling two dice a thousand times"""
CODE_TEMPLATES = [
    "Write a Python function that {t}.",
    "Write a Python function that {t}. Include a docstring and two example calls.",
    "Write a Python function that {t}, and a pytest test for it.",
    "Explain how you would write a program that {t}, then write it in Python.",
    "Write a JavaScript function that {t}.",
    "Write a Python function that {t}, using only the standard library, and explain its time complexity.",
]
# Small snippets written for this corpus, each with instructions that fit it; "{code}" is the snippet.
CODE_SNIPPETS = [
    "def total(prices):\n    t = 0\n    for p in prices:\n        t = t + p\n    return t",
    "def greet(name):\n    print('Hello ' + name + '!')",
    "def evens(numbers):\n    result = []\n    for n in numbers:\n        if n % 2 == 0:\n"
    "            result.append(n)\n    return result",
    "def read_config(path):\n    f = open(path)\n    data = f.read()\n    f.close()\n    return data",
    "def is_adult(age):\n    if age >= 18:\n        return True\n    else:\n        return False",
    "def count_chars(text):\n    counts = {}\n    for ch in text:\n        if ch in counts:\n"
    "            counts[ch] += 1\n        else:\n            counts[ch] = 1\n    return counts",
    "def area(w, h):\n    return w * h",
    "class Account:\n    def __init__(self, owner):\n        self.owner = owner\n        self.balance = 0\n\n"
    "    def deposit(self, amount):\n        self.balance += amount",
    "def first_word(s):\n    return s.split(' ')[0]",
    "def to_upper(words):\n    out = []\n    for w in words:\n        out.append(w.upper())\n    return out",
    "def divide(a, b):\n    return a / b",
    "def load_numbers(path):\n    numbers = []\n    for line in open(path):\n        numbers.append(int(line))\n"
    "    return numbers",
    "x = [3, 1, 2]\ny = sorted(x)\nz = y[::-1]\nprint(z)",
    "def c2f(c):\n    return c * 9 / 5 + 32",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y",
    "def find(items, target):\n    for i in range(len(items)):\n        if items[i] == target:\n            return i\n"
    "    return -1",
    "def merge(a, b):\n    d = a.copy()\n    for k in b:\n        d[k] = b[k]\n    return d",
    "def word_lengths(sentence):\n    lengths = []\n    for word in sentence.split():\n"
    "        lengths.append(len(word))\n    return lengths",
]
SNIPPET_TEMPLATES = [
    "Add type hints and a docstring to this Python code, without changing what it does:\n\n```python\n{code}\n```",
    "Explain what this Python code does, line by line:\n\n```python\n{code}\n```",
    "Add a short comment above each line of this Python code and return the full code:\n\n```python\n{code}\n```",
    "Rewrite this Python code to be shorter and more idiomatic, and explain each change:\n\n```python\n{code}\n```",
    "What inputs could make this Python code fail? Suggest a fix for each.\n\n```python\n{code}\n```",
    "Write three pytest tests for this Python code:\n\n```python\n{code}\n```",
    "Translate this Python code into JavaScript:\n\n```python\n{code}\n```",
    "Rename the variables in this Python code to clearer names and return the full code:\n\n```python\n{code}\n```",
]
BUGGY_SNIPPETS = [
    "def average(xs):\n    return sum(xs) / len(xs) + 1",
    "def last_item(items):\n    return items[len(items)]",
    "def count_up(n):\n    i = 0\n    while i < n:\n        print(i)",
    "def is_even(n):\n    return n % 2 == 1",
    "def add_item(item, items=[]):\n    items.append(item)\n    return items",
    "def max_of(numbers):\n    best = 0\n    for n in numbers:\n        if n > best:\n            best = n\n"
    "    return best",
    "def reverse(s):\n    out = ''\n    for ch in s:\n        out = out + ch\n    return out",
    "def contains(items, x):\n    for item in items:\n        if item == x:\n            return True\n"
    "        return False",
    "def percent(part, whole):\n    return part / whole * 10",
    "def squares(n):\n    return [i * i for i in range(1, n)]",
]
BUG_TEMPLATES = [
    "This Python function has a bug. Find it, explain it and give the corrected code:\n\n```python\n{code}\n```",
    "Why does this Python code not behave as intended? Fix it.\n\n```python\n{code}\n```",
]


def _code_prompts() -> list[str]:
    out = [tpl.format(t=t) for t in _split(CODE_TASKS) for tpl in CODE_TEMPLATES]
    out += [tpl.format(code=c) for c in CODE_SNIPPETS for tpl in SNIPPET_TEMPLATES]
    out += [tpl.format(code=c) for c in BUGGY_SNIPPETS for tpl in BUG_TEMPLATES]
    return out


# --------------------------------------------------------------------------------------------------------- math

NAMES = ["Ana", "Ben", "Chloe", "David", "Elif", "Femi", "Grace", "Hugo", "Ines", "Jamal", "Kira", "Liam", "Maya",
         "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yusuf", "Zoe"]
ITEMS = ["pens", "stickers", "apples", "notebooks", "marbles", "cupcakes", "stamps", "books", "oranges", "cards"]
ASKS = ["Show your working.", "Explain each step.", "Solve it step by step.", "Explain your reasoning.",
        "Give the answer and a short explanation.", "Show the calculation."]


def _math_problem(r: random.Random) -> str:
    """One word problem with fresh numbers; every form has a whole-number or simple decimal answer."""
    a, b = r.sample(NAMES, 2)
    item = r.choice(ITEMS)
    k = r.randrange(14)
    if k == 0:
        n, m = r.randint(3, 40), r.randint(2, 30)
        q = f"{a} has {n + m} {item} and gives {m} to {b}. How many {item} does {a} have left?"
    elif k == 1:
        price, n = r.randint(2, 30), r.randint(2, 15)
        q = f"One of the {item} costs {price} dollars. How much do {n} of them cost?"
    elif k == 2:
        speed, hours = r.choice([40, 50, 60, 75, 80, 90, 100]), r.randint(2, 6)
        q = f"A bus travels at {speed} kilometres per hour for {hours} hours. How far does it go?"
    elif k == 3:
        p, whole = r.choice([5, 10, 20, 25, 30, 40, 50, 75]), r.randrange(40, 1000, 20)
        q = f"What is {p} percent of {whole}?"
    elif k == 4:
        w, h = r.randint(2, 25), r.randint(2, 25)
        q = f"A garden is {w} metres long and {h} metres wide. What is its area, and how much fence goes around it?"
    elif k == 5:
        x, m, c = r.randint(1, 20), r.randint(2, 9), r.randint(1, 30)
        q = f"Solve for x: {m}x + {c} = {m * x + c}."
    elif k == 6:
        ratio, total = r.randint(2, 5), r.randint(2, 12)
        q = (f"{a} has {ratio} times as many {item} as {b}. Together they have {(ratio + 1) * total} {item}. "
             f"How many does each have?")
    elif k == 7:
        nums = [r.randint(1, 50) for _ in range(r.randint(3, 6))]
        q = f"What is the average of {', '.join(map(str, nums[:-1]))} and {nums[-1]}?"
    elif k == 8:
        red, blue = r.randint(1, 9), r.randint(1, 9)
        q = f"A box has {red} red and {blue} blue {item}. If you pick one at random, what is the chance it is red?"
    elif k == 9:
        weekly, goal = r.randint(5, 40), r.randint(5, 20)
        q = f"{a} saves {weekly} dollars a week. How many weeks until {a} has {weekly * goal} dollars?"
    elif k == 10:
        start_h, dur = r.randint(6, 15), r.randint(20, 200)
        q = f"A film starts at {start_h}:00 and lasts {dur} minutes. At what time does it end?"
    elif k == 11:
        people, slices = r.randint(2, 8), r.randint(2, 4)
        q = (f"{people} friends each want {slices} slices of pizza. Each pizza has 8 slices. "
             "How many pizzas do they need?")
    elif k == 12:
        price, off = r.randrange(20, 400, 5), r.choice([10, 15, 20, 25, 30, 50])
        q = f"A jacket costs {price} dollars and is on sale for {off} percent off. What is the sale price?"
    else:
        n = r.randint(3, 12)
        q = f"What is the sum of the whole numbers from 1 to {n * 5}? Is there a shortcut?"
    return f"{q} {r.choice(ASKS)}"


def _math_prompts(r: random.Random, count: int = 1600) -> list[str]:
    seen: dict[str, None] = {}
    for _ in range(count * 3):
        seen.setdefault(_math_problem(r))
        if len(seen) >= count:
            break
    return list(seen)


# ------------------------------------------------------------------------------------------- editing and letters

PARAGRAPHS = [
    "Our neighbourhood library opens at nine in the morning. On Saturdays there is a reading hour for children, "
    "and volunteers help older people use the computers. Last month the library added a small cafe.",
    "I started cycling to work in the spring. The first week was hard because of the hill near the station, "
    "but now I enjoy the fresh air. I save money on bus tickets and I sleep better.",
    "The meeting on Thursday will cover the new budget. Please read the attached report before you come. "
    "If you cannot attend, send your questions to Maria by Wednesday evening.",
    "To plant a tree, dig a hole twice as wide as the roots. Put the tree in the hole and fill it with soil. "
    "Press the soil down gently and water the tree well. Water it every week during the first summer.",
    "The museum has a new exhibition about ancient boats. Visitors can see a canoe that is two thousand years "
    "old. There is also a workshop where children can build small model boats.",
    "My grandmother grows tomatoes, beans and potatoes in her garden. Every autumn she makes jam from the "
    "plums on her old tree. She gives most of it away to her neighbours.",
    "The company will close its office for two days in December for repairs to the heating. Staff should work "
    "from home on those days. The office will open again on Monday as usual.",
    "Yesterday the train was late again. I waited on the cold platform for forty minutes. When it finally came, "
    "it was so full that I had to stand all the way to the city.",
    "Our school team won the regional football final on Sunday. The match was close, and the winning goal came "
    "in the last minute. The players celebrated with their families after the game.",
    "The recipe is simple. Mix the flour, sugar and eggs in a bowl. Add the milk slowly and stir until smooth. "
    "Pour the mix into a tin and bake it for thirty minutes.",
    "The town council wants to build a new park near the river. Some people like the idea because there is "
    "little green space. Others worry about the cost and the traffic during building.",
    "I have been learning Spanish for six months. I practise with an app every morning and I watch films with "
    "subtitles. Next year I hope to visit Madrid and talk with people there.",
    "The new phone has a larger screen and a better camera. The battery lasts about two days. However, it is "
    "more expensive than the old model and it does not come with a charger.",
    "Please remember to switch off the lights when you leave the room. Close the windows if it rains. "
    "The last person to leave in the evening should lock the front door.",
    "The storm last night knocked down two trees on our street. Nobody was hurt, but one car was damaged. "
    "Workers from the city came this morning to clear the road.",
    "Our team launched the new website on Monday. Traffic doubled in the first week. We fixed three small bugs "
    "and we are now working on a faster search page.",
    "Mark opens his bakery at six every morning. He bakes bread, rolls and a few cakes. By noon most of the bread "
    "is sold, and he spends the afternoon cleaning and planning the next day.",
    "The hotel was close to the beach and the staff were friendly. Our room was small but clean. Breakfast was "
    "good, although the coffee could have been stronger.",
]
EDIT_TEMPLATES = [
    "Rewrite the following paragraph in a more formal tone:\n\n{p}",
    "Rewrite the following paragraph in a casual, friendly tone:\n\n{p}",
    "Rewrite the following text in the past tense:\n\n{p}",
    "Rewrite the following text in the future tense:\n\n{p}",
    "Turn the following paragraph into a bulleted list:\n\n{p}",
    "Summarize the following paragraph in one sentence:\n\n{p}",
    "Give the following paragraph a short title, then rewrite it for a child of eight:\n\n{p}",
    "Rewrite the following paragraph from the point of view of a different person in the story:\n\n{p}",
    "Make the following paragraph about half as long without losing any facts:\n\n{p}",
    "Translate the following paragraph into French:\n\n{p}",
    "Write three questions that test whether someone understood this paragraph:\n\n{p}",
    "Rewrite the following text as a short news report:\n\n{p}",
]
TYPO_TEMPLATES = [
    "Fix the spelling mistakes in the following text and return only the corrected text:\n\n{p}",
    "Correct the typos in this paragraph without changing anything else:\n\n{p}",
]
TABLE_TEMPLATES = [
    "Convert the following list into a Markdown table with the columns Name, Age and City:\n\n{p}",
    "Turn this list of people into JSON: a list of objects with the keys name, age and city.\n\n{p}",
    "Sort the following people by age, youngest first, and return the list in the same format:\n\n{p}",
]
CITIES = ["Lyon", "Osaka", "Leeds", "Porto", "Austin", "Lagos", "Perth", "Graz", "Quito", "Pune", "Oslo", "Cork"]

LETTER_PURPOSES = [
    ("my landlord", "asking for the broken heater to be repaired"),
    ("my landlord", "giving notice that I will move out at the end of next month"),
    ("my manager", "asking for two days off next week"),
    ("my manager", "suggesting a new way to run our weekly meeting"),
    ("a colleague", "thanking them for their help with a project"),
    ("a colleague", "asking them to review a report by Friday"),
    ("my child's teacher", "explaining that my child was ill yesterday"),
    ("my child's teacher", "asking for a short meeting about homework"),
    ("a neighbour", "inviting them to a small summer party"),
    ("a neighbour", "asking them to keep the noise down after ten at night"),
    ("customer support", "reporting that a parcel arrived damaged"),
    ("customer support", "asking to cancel a gym membership"),
    ("a hotel", "asking whether they have a room with a sea view"),
    ("a restaurant", "booking a table for eight people on Saturday"),
    ("a former professor", "asking for a reference letter"),
    ("a hiring manager", "following up after a job interview"),
    ("a club", "asking how to become a member"),
    ("the council", "reporting a broken street light"),
    ("a friend", "congratulating them on a new job"),
    ("a friend", "apologising for missing their birthday"),
    ("my team", "announcing that a project has been delayed"),
    ("my team", "welcoming a new member"),
    ("a supplier", "asking for a discount on a large order"),
    ("a client", "sending an invoice and thanking them for their business"),
    ("my bank", "asking why a payment was declined"),
]
LETTER_TEMPLATES = [
    "Write a short email to {who}, {what}.",
    "Write a polite, formal email to {who}, {what}.",
    "Write a friendly message to {who}, {what}. Keep it under 100 words.",
    "Write a letter to {who}, {what}. Use a warm but professional tone.",
    "Draft a brief text message to {who}, {what}.",
    "Write two versions of an email to {who}, {what}: one formal and one casual.",
]


def _typos(text: str, r: random.Random, rate: float = 0.08) -> str:
    """Misspell about `rate` of the longer words: swap two letters, drop one or double one."""
    words = text.split(" ")
    for i, w in enumerate(words):
        if len(w) > 4 and w.isalpha() and r.random() < rate:
            j = r.randrange(1, len(w) - 2)
            kind = r.randrange(3)
            words[i] = (w[:j] + w[j + 1] + w[j] + w[j + 2:] if kind == 0 else w[:j] + w[j + 1:] if kind == 1
                        else w[:j] + w[j] + w[j:])
    return " ".join(words)


def _edit_prompts(r: random.Random) -> list[str]:
    out = [tpl.format(p=p) for p in PARAGRAPHS for tpl in EDIT_TEMPLATES]
    for p in PARAGRAPHS:
        for tpl in TYPO_TEMPLATES:
            for _ in range(3):
                out.append(tpl.format(p=_typos(p, r)))
    for _ in range(60):
        people = [f"- {n}, {r.randint(18, 80)}, {r.choice(CITIES)}" for n in r.sample(NAMES, r.randint(3, 6))]
        out.append(r.choice(TABLE_TEMPLATES).format(p="\n".join(people)))
    return out


def _letter_prompts() -> list[str]:
    return [tpl.format(who=who, what=what) for who, what in LETTER_PURPOSES for tpl in LETTER_TEMPLATES]


# ----------------------------------------------------------------------------------------------------- passages

STDLIB_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fnmatch", "fractions",
    "functools", "glob", "graphlib", "gzip", "hashlib", "heapq", "html.parser", "http.client", "inspect",
    "io", "ipaddress", "itertools", "json", "logging", "numbers", "operator", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil", "socket", "sqlite3", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "typing", "unittest", "urllib.parse", "uuid", "weakref", "xml.etree.ElementTree", "zipfile", "zlib",
)
PASSAGE_TEMPLATES = [
    "Summarize this passage in two sentences:\n\n{p}",
    "Explain what this documentation says to a beginner:\n\n{p}",
    "Write a question a student could ask about this text, then answer it:\n\n{p}",
    "List the main points of the following text as bullet points:\n\n{p}",
    "Rewrite this passage in plain, simple English:\n\n{p}",
    "What is the most important idea in this passage? Explain why.\n\n{p}",
    "Give a short example that illustrates what this text describes:\n\n{p}",
    "Write three quiz questions, with answers, based on this passage:\n\n{p}",
    "Explain this text to a colleague who has never used Python:\n\n{p}",
    "What would be a good title for this passage? Give three options and explain your favourite.\n\n{p}",
]
SOURCE_TEMPLATES = [
    "Explain what this function from the Python standard library does, step by step:\n\n```python\n{p}\n```",
    "Write three pytest tests for this function from the Python standard library:\n\n```python\n{p}\n```",
    "Add type hints to this Python function and return the full code:\n\n```python\n{p}\n```",
    "Describe the inputs, the output and the edge cases of this Python function:\n\n```python\n{p}\n```",
]


def _chunks(units: Iterable[str], target: int = 600, low: int = PASSAGE_CHARS[0],
            high: int = PASSAGE_CHARS[1]) -> list[str]:
    """Pack text units (documentation entries, paragraphs) into passages of about `target` and at most `high`
    characters, keeping units whole; a unit over `high` is split into its paragraphs, and a paragraph over
    `high` is dropped. Passages under `low` characters are dropped."""
    pieces: list[str] = []
    for unit in (u.strip() for u in units):
        pieces += [unit] if len(unit) <= high else [p.strip() for p in re.split(r"\n\s*\n", unit)]
    out, cur = [], ""
    for piece in pieces:
        if not piece or len(piece) > high:
            continue
        if cur and len(cur) + 2 + len(piece) > high:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{piece}" if cur else piece
        if len(cur) >= target:
            out.append(cur)
            cur = ""
    if cur:
        out.append(cur)
    return [c for c in out if len(c) >= low]


def _entry(obj, qualname: str) -> str:
    """A documentation entry: a signature line, then the docstring ("" when there is none)."""
    doc = inspect.getdoc(obj)
    if not doc:
        return ""
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        sig = ""
    sig = re.sub(r" at 0x[0-9a-f]+", "", sig)  # default values whose repr has an address: not deterministic
    return f"{'class ' if inspect.isclass(obj) else ''}{qualname}{sig}\n{doc}"


def _module_texts(mod) -> Iterable[tuple[list[str], list]]:
    """Per module: its docstring, its functions' entries, then each class with its methods' entries, each with
    the functions whose source may become a passage. Short entries packed together read like a page of the
    library reference."""
    yield [inspect.getdoc(mod) or ""], []
    public = [(name, obj) for name, obj in sorted(vars(mod).items())
              if not name.startswith("_") and getattr(obj, "__module__", None) == mod.__name__]
    funcs = [obj for _, obj in public if inspect.isfunction(obj)]
    yield [_entry(f, f.__name__) for f in funcs], funcs
    for name, cls in public:
        if inspect.isclass(cls):
            methods = [m for mname, m in sorted(vars(cls).items())
                       if not mname.startswith("_") and inspect.isfunction(m)]
            yield [_entry(cls, name)] + [_entry(m, f"{name}.{m.__name__}") for m in methods], methods


def stdlib_passages(modules: Iterable[str] = STDLIB_MODULES) -> tuple[list[str], list[str]]:
    """(documentation passages, short function sources) from the given standard library modules, in a fixed
    order."""
    docs: dict[str, None] = {}
    sources: dict[str, None] = {}
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # a module left out of this Python build
            continue
        with warnings.catch_warnings():  # reading some docstrings warns (deprecated typing aliases)
            warnings.simplefilter("ignore", DeprecationWarning)
            texts = list(_module_texts(mod))
        for units, funcs in texts:
            for chunk in _chunks(units):
                docs.setdefault(chunk)
            for f in funcs:
                try:
                    src = inspect.getsource(f)
                except (OSError, TypeError):
                    continue
                src = inspect.cleandoc(src) if src.startswith((" ", "\t")) else src.strip()
                if 5 <= src.count("\n") <= 30 and PASSAGE_CHARS[0] <= len(src) <= PASSAGE_CHARS[1]:
                    sources.setdefault(src)
    return list(docs), list(sources)


class _ParagraphText(HTMLParser):
    """Text of the <p> elements of a page (Sphinx puts prose there; code, tables and navigation are skipped)."""

    def __init__(self):
        super().__init__()
        self.paragraphs: list[str] = []
        self._depth = 0
        self._buf: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "p":
            self._depth += 1

    def handle_endtag(self, tag):
        if tag == "p" and self._depth:
            self._depth -= 1
            if not self._depth:
                text = re.sub(r"\s+", " ", "".join(self._buf)).strip()
                if text:
                    self.paragraphs.append(text)
                self._buf = []

    def handle_data(self, data):
        if self._depth:
            self._buf.append(data)


def python_doc_passages(root: str | Path | None = None, limit: int = 4000) -> list[str]:
    """Passages from the Python HTML manual (Debian package `python3-doc`); [] where it is not installed."""
    roots = [Path(root)] if root else sorted(Path("/").glob(PYTHON_DOC_GLOB.lstrip("/")))
    out: dict[str, None] = {}
    for base in roots:
        for page in sorted(base.rglob("*.html")):
            parser = _ParagraphText()
            try:
                parser.feed(page.read_text(encoding="utf-8", errors="replace"))
            except (OSError, ValueError):
                continue
            for chunk in _chunks(parser.paragraphs):
                out.setdefault(chunk)
                if len(out) >= limit:
                    return list(out)
    return list(out)


def _passage_prompts(r: random.Random, doc_root: str | Path | None = None) -> list[str]:
    docs, sources = stdlib_passages()
    docs += python_doc_passages(doc_root)
    out = [r.choice(PASSAGE_TEMPLATES).format(p=p) for p in docs]
    out += [r.choice(SOURCE_TEMPLATES).format(p=p) for p in sources]
    return out


# ------------------------------------------------------------------------------------------------------- corpus


def normalize(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive form of a prompt, for deduplication and exclusion."""
    return " ".join(re.findall(r"\w+", text.casefold()))


def bench_prompt_keys(folder: str | Path = BENCH_PROMPTS_DIR) -> set[str]:
    """Normalised text of every evaluation prompt (benchmarks, shipped drafters' held-out sets): never trained on."""
    keys = set()
    paths = sorted(Path(folder).glob("*.jsonl"))
    if Path(folder) == BENCH_PROMPTS_DIR:
        paths += sorted(BENCH_PROMPTS_DIR.parent.parent.glob(SHIPPED_HELDOUT_GLOB))
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                keys.add(normalize(json.loads(line)["prompt"]))
    return keys


def build_prompts(n: int | None = None, seed: int = 0, sources: Iterable[str] = DEFAULT_SOURCES,
                  doc_root: str | Path | None = None) -> list[dict]:
    """Distinct prompts, none of them a benchmark prompt, as rows {"id", "prompt", "source"}.

    n=None returns the whole corpus (shuffled); otherwise n rows drawn from the pools in POOL_WEIGHTS proportions.
    The same seed (on the same Python installation) gives the same rows.
    """
    sources = tuple(sources)
    unknown = set(sources) - set(DEFAULT_SOURCES)
    if unknown:
        raise ValueError(f"unknown prompt source(s) {sorted(unknown)}; built-in sources are {DEFAULT_SOURCES}")
    r = random.Random(seed)
    pools: dict[str, list[str]] = {}
    if "template" in sources:
        pools.update(topic=_topic_prompts(), code=_code_prompts(), math=_math_prompts(r), edit=_edit_prompts(r),
                     letter=_letter_prompts())
    if "passage" in sources:
        pools["passage"] = _passage_prompts(r, doc_root)

    seen = bench_prompt_keys()
    for name in pools:  # dedupe within and across pools, in a fixed pool order, then shuffle each
        kept = []
        for p in pools[name]:
            key = normalize(p)
            if key not in seen:
                seen.add(key)
                kept.append(p)
        r.shuffle(kept)
        pools[name] = kept

    total = sum(len(p) for p in pools.values())
    if n is None or n >= total:
        picked = {name: pool for name, pool in pools.items()}
    else:
        weight = sum(POOL_WEIGHTS[name] for name in pools)
        picked = {name: pool[: round(n * POOL_WEIGHTS[name] / weight)] for name, pool in pools.items()}
        spare = [p for name, pool in pools.items() for p in pool[len(picked[name]):]]
        r.shuffle(spare)
        short = n - sum(len(p) for p in picked.values())
        picked["spare"] = spare[:short] if short > 0 else []
        if short < 0:  # rounding overshoot: trim the largest pool
            biggest = max(pools, key=lambda k: len(picked[k]))
            picked[biggest] = picked[biggest][:short]
    passages = set(pools.get("passage", ()))
    rows = [p for pool in picked.values() for p in pool]
    r.shuffle(rows)
    return [{"id": f"builtin-{i:05d}", "prompt": p, "source": "passage" if p in passages else "template"}
            for i, p in enumerate(rows)]


# ------------------------------------------------------------------------------------------------ self-instruct

SELF_INSTRUCT_TEMPLATES = [
    "Write one question that a curious person might ask about {t}. Reply with the question only.",
    "Write one question a student might ask a teacher about {t}. Reply with the question only.",
    "Write one request for help about {t}, the way a user would type it to an assistant. "
    "Reply with the request only.",
    "Write one practical task about {t} that someone could ask an assistant to do. Reply with the task only.",
]
_LABEL = re.compile(r"^(?:(?:question|task|request|q|prompt)\s*\d*\s*[:.)-]|\d+\s*[.)]|[-•]|#+)\s*", re.I)
_WRAPPING = "\"“”'*_`"
# A usable reply is a question, or a request that opens with one of these verbs.
_IMPERATIVES = frozenset("""write explain describe list give make plan create suggest compare summarize summarise tell
    show help teach find calculate recommend design draft translate rewrite outline convert build name research
    prepare organise organize choose""".split())
# Replies that talk as the assistant, refuse, or talk about the request instead of making one.
_UNUSABLE = re.compile(r"^(?:i'm sorry|i am sorry|sorry|as an ai|i cannot|i can't|here is|here's|sure|certainly)\b|"
                       r"\b(?:how can i (?:help|assist)|what can i help|i'm here to|i am here to|please provide|"
                       r"would you like|ready to assist|helpful ai|curious person|reply with|question only|"
                       r"task only|request only)\b", re.I)


def _bare(line: str) -> str:
    while True:  # markers may nest: "1. **Question:** ..."
        bare = _LABEL.sub("", line.strip().strip(_WRAPPING)).strip().strip(_WRAPPING).strip()
        if bare == line:
            return line
        line = bare


def self_instruct_requests(n: int, seed: int = 0) -> list[str]:
    """n distinct meta-prompts asking the target to write a question or task about a topic."""
    combos = [tpl.format(t=t) for t in topics() for tpl in SELF_INSTRUCT_TEMPLATES]
    if n > len(combos):
        raise ValueError(f"at most {len(combos)} self-instruct requests are available, asked for {n}")
    return random.Random(f"self-instruct:{seed}").sample(combos, n)


def clean_self_instruct(text: str, min_chars: int = 15, max_chars: int = 300) -> str | None:
    """The question or task in the target's reply to a self-instruct request, or None when it is unusable.

    Reads the first non-empty line. Small models wrap the question ('A student might ask: "Why ...?"'), so a quoted
    part, then the part after a colon, is preferred to the whole line; list markers, "Question:" labels and quotes
    are dropped, and a question is cut after its question mark (models often answer it on the same line). What is
    left must be a question or start with an imperative verb, and must not be the model talking as the assistant.
    A line with a quote or a colon is only framing, so it is not used whole.
    """
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    candidates = [m.group(1) for m in re.finditer(r"[\"“]([^\"“”]{%d,})" % min_chars, line)]
    candidates += line.split(": ")[1:]
    candidates = candidates or [line]  # a line with a quote or a colon is framing around the question
    for candidate in candidates:
        cand = _bare(candidate)
        if "?" in cand:
            cand = cand[: cand.index("?") + 1]
        words = cand.split()
        if not (min_chars <= len(cand) <= max_chars and len(words) >= 3):
            continue
        if sum(c.isalpha() for c in cand) < len(cand) / 2 or _UNUSABLE.search(cand):
            continue
        if cand.endswith("?") or words[0].lower().strip(",") in _IMPERATIVES:
            return cand
    return None


# ------------------------------------------------------------------------------------------------------ files


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write one JSON object per line (UTF-8, non-ASCII kept); returns the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def prompt_hash(text: str, salt: str = "") -> float:
    """A stable number in [0, 1) for a prompt, from its normalised text: used to split and subsample by prompt."""
    digest = hashlib.sha256(f"{salt}\0{normalize(text)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
