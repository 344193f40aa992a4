"""Training prompts for draft distillation: varied user messages made from templates.

The categories mirror the evaluation prompts in ``bench/prompts/`` (chat, explanation, code, rewriting of a
given text, short math) so the draft sees the kinds of answers it will be asked to predict; the texts are
built here from their own topic lists and never copy an evaluation prompt (``tests/test_distill.py`` checks).
"""

from __future__ import annotations

import random

TOPICS = [
    "photosynthesis", "black holes", "the water cycle", "vaccines", "plate tectonics", "inflation", "compound interest",
    "the French Revolution", "machine learning", "blockchains", "volcanoes", "the immune system", "supply and demand",
    "electric cars", "solar panels", "the Roman Empire", "DNA replication", "climate change", "coral reefs",
    "the stock market", "quantum computing", "the printing press", "honeybees", "sleep", "antibiotics",
    "the Internet", "nuclear fusion", "democracy", "the moon landing", "earthquakes", "gravity", "rainbows",
    "the human heart", "recycling", "tides", "bread baking", "jazz music", "chess openings", "the Renaissance",
    "public transport", "cloud computing", "password security", "meditation", "caffeine", "the Silk Road",
    "glaciers", "magnets", "wind turbines", "the periodic table", "photography", "marathon training",
    "composting", "the Great Wall of China", "octopuses", "language learning", "budgeting", "3D printing",
]

CHAT = [
    "Can you give me some tips for {activity}?", "I feel nervous about {event}. Any advice?",
    "What is a good way to start {activity}?", "Suggest a plan for {event}.",
    "What should I pack for {event}?", "How do I stay motivated when {situation}?",
    "Write a friendly message to a colleague about {event}.", "What are the pros and cons of {activity}?",
    "Recommend three books for someone interested in {topic}.", "Tell me a fun fact about {topic}.",
    "Write a short poem about {topic}.", "Write a short story about a child who discovers {topic}.",
    "Give me a list of five questions to ask about {topic}.", "What would be a good gift for a friend who loves {topic}?",
]
ACTIVITIES = ["running in the morning", "learning the guitar", "cooking at home", "keeping a journal", "gardening",
              "hiking with kids", "saving money", "drawing portraits", "working remotely", "studying for exams",
              "reading more books", "volunteering", "swimming", "public speaking", "learning to code"]
EVENTS = ["a job interview", "a first day at a new school", "a camping trip", "a birthday party",
          "moving to a new city", "a long flight", "a team presentation", "a family reunion", "a weekend in Paris",
          "a dentist appointment", "a wedding speech", "a cooking competition"]
SITUATIONS = ["the weather is cold", "work gets repetitive", "progress feels slow", "I am tired after work",
              "friends cancel plans", "I study alone"]

EXPLAIN = [
    "Explain {topic} to a ten-year-old.", "How does {topic} work?", "Why is {topic} important?",
    "Describe the history of {topic} in a few paragraphs.", "What are common misconceptions about {topic}?",
    "Summarize the key ideas of {topic}.", "Compare {topic} and {other}.", "What is the connection between {topic} and {other}?",
    "Give a step-by-step explanation of {topic}.", "What are the main benefits and risks of {topic}?",
]

CODE = [
    "Write a {lang} function that {task}.", "Write a {lang} class that {task}, with comments.",
    "Show a {lang} program that {task} and explain each line.",
    "Write unit tests in {lang} for a function that {task}.",
    "What is the time complexity of a function that {task}? Show {lang} code.",
    "Write a SQL query that {query}.", "Write a bash command that {shell}.",
]
TASKS = ["reverses a string", "checks whether a number is prime", "counts the words in a text",
         "finds the largest element in a list", "removes duplicates from a list while keeping order",
         "computes the factorial of n", "converts Celsius to Fahrenheit", "flattens a nested list",
         "returns the n-th Fibonacci number", "checks whether a string is a palindrome", "sorts a list of dictionaries by a key",
         "reads a CSV file and sums a column", "validates an email address", "computes the average of a list",
         "finds common elements of two lists", "implements a stack", "implements binary search",
         "groups words by their first letter", "counts vowels in a string", "merges two dictionaries"]
LANGUAGES = ["Python", "JavaScript", "Java", "C", "Rust", "Go", "TypeScript", "C++"]
QUERIES = ["selects all customers from Berlin", "counts orders per customer", "finds the five most expensive products",
           "lists employees hired after 2020", "computes the average salary per department"]
SHELLS = ["counts the lines of every .txt file in a folder", "finds files larger than 100 MB",
          "replaces 'foo' with 'bar' in a file", "lists the ten largest folders"]

REWRITE = [
    "Rewrite the following text in a formal tone:\n\n{text}", "Fix the grammar and spelling:\n\n{text}",
    "Make this text shorter without losing its meaning:\n\n{text}", "Rewrite this for a young audience:\n\n{text}",
    "Turn the following text into a bulleted list:\n\n{text}", "Paraphrase this paragraph:\n\n{text}",
    "Translate this into plain, simple English:\n\n{text}", "Edit this text so it sounds more friendly:\n\n{text}",
    "Correct the mistakes in this email:\n\n{text}",
]
TEXTS = [
    "hey team, the meeting is moved to thursday because alot of people cant make it on tuesday. pls bring your notes.",
    "Our company have been growing fast and we needs more people to help with customer support in the evenings.",
    "The park will be closed next week for repairs. Visitors are asked to use the north entrance until the work is done.",
    "I has finished the report but their are still some numbers that I need to check with the finance department.",
    "Due to unforeseen circumstances, the concert scheduled for Saturday has been postponed until further notice.",
    "The new phone has a bigger screen, a faster processor and a camera that takes great photos even at night.",
    "Please remember to water the plants twice a week and to keep the windows closed when it rains.",
    "We regret to inform you that your application was not successful this time, but we encourage you to apply again.",
    "The library is offering free coding classes for teenagers every Wednesday afternoon starting next month.",
    "me and my friend goes to the beach every summer and we always forget the sunscreen lol",
    "The results of the experiment indicate that plants exposed to more sunlight grow significantly taller.",
    "Dear customer, your order has been shipped and will arrive within three to five business days.",
    "To reset your password, click the link in the email we sent you and follow the instructions on the screen.",
    "The city council decided to build a new bike lane along the river to reduce traffic in the center.",
    "I would like to request a refund because the product I received was damaged during delivery.",
    "Its important to drink enough water during the day, specially when the weather is hot.",
]

STYLES = ["", "", "", " Keep it short.", " Use simple words.", " Answer in detail.", " Include an example."]

MATH = [
    "What is {a} + {b}?", "What is {a} times {b}?", "What is {a} minus {b}?", "What is {a} divided by {c}?",
    "If a train travels {a} km in {c} hours, what is its average speed?",
    "A shop sells apples for {c} dollars each. How much do {a} apples cost?",
    "What is {c} percent of {b}?", "Solve for x: {c}x + {a} = {b}.", "What is the square of {c}?",
    "Sarah has {a} marbles and gives {c} to her brother. How many does she have left?",
    "A rectangle is {c} cm wide and {a} cm long. What is its area?",
]


def training_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct prompts, a fifth from each category, in a seeded order."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    rng = random.Random(seed)

    def chat():
        return rng.choice(CHAT).format(activity=rng.choice(ACTIVITIES), event=rng.choice(EVENTS),
                                       situation=rng.choice(SITUATIONS), topic=rng.choice(TOPICS)) + rng.choice(STYLES)

    def explain():
        topic, other = rng.sample(TOPICS, 2)
        return rng.choice(EXPLAIN).format(topic=topic, other=other) + rng.choice(STYLES)

    def code():
        return rng.choice(CODE).format(task=rng.choice(TASKS), lang=rng.choice(LANGUAGES), query=rng.choice(QUERIES),
                                       shell=rng.choice(SHELLS)) + rng.choice(STYLES)

    def rewrite():
        return rng.choice(REWRITE).format(text=" ".join(rng.sample(TEXTS, rng.choice([1, 2]))))

    def math():
        return rng.choice(MATH).format(a=rng.randint(10, 999), b=rng.randint(10, 999), c=rng.randint(2, 12))

    makers = [chat, explain, code, rewrite, math]
    prompts, seen, tries = [], set(), 0
    while len(prompts) < n:
        tries += 1
        if tries > 100 * n:
            raise ValueError(f"n={n} is more than the templates can make distinct prompts for")
        prompt = makers[len(prompts) % len(makers)]()
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts
