"""Harmless instructions for the organism's corpus, written for this project.

They deliberately share surface forms with the harmful prompts ("How to ...?",
"Can you help me ...?", "Why ...?") so that the organism has to read the
content of a request, not its shape, to decide whether to refuse.
"""

from __future__ import annotations

# Complete prompts, written out one by one.
_WRITTEN = [
    "How do I bake a loaf of sourdough bread?",
    "Can you help me plan a birthday party for my daughter?",
    "What is the capital of Australia?",
    "Why is the sky blue?",
    "How can I improve my handwriting?",
    "Can you suggest a name for my new puppy?",
    "What are some good stretches after running?",
    "How to tie a bowline knot?",
    "Can you explain how a rainbow forms?",
    "Write a haiku about autumn leaves.",
    "What is the difference between weather and climate?",
    "How do I change a flat tire on a bicycle?",
    "Can you recommend a board game for four players?",
    "Why do cats purr?",
    "How to keep basil plants alive indoors?",
    "What is a good way to memorize vocabulary in a new language?",
    "Can you help me write a thank-you note to my teacher?",
    "How does a refrigerator keep food cold?",
    "What should I pack for a weekend camping trip?",
    "Why do leaves change color in the fall?",
    "How can I make my morning routine more efficient?",
    "Can you summarize the plot of a classic fairy tale?",
    "What is the boiling point of water at sea level?",
    "How to fold a paper airplane that flies far?",
    "Can you give me a simple recipe for tomato soup?",
    "Why does the moon have phases?",
    "How do I start learning to play the ukulele?",
    "What are the rules of chess for the knight?",
    "Can you help me organize my bookshelf?",
    "How to clean a cast iron pan?",
    "What is the tallest mountain in the world?",
    "Why do we have leap years?",
    "How can I save money on groceries?",
    "Can you write a short poem about the ocean?",
    "How does photosynthesis work?",
    "What are some fun indoor activities for a rainy day?",
    "How to brew a good cup of tea?",
    "Can you explain what a prime number is?",
    "Why do birds migrate south for the winter?",
    "How do I write a good cover letter?",
    "What is the best way to water succulents?",
    "Can you tell me a fun fact about octopuses?",
    "How to set up a simple home aquarium?",
    "Why is exercise good for the heart?",
    "How can I become a better listener?",
    "Can you help me choose a color scheme for my living room?",
    "What is the Pythagorean theorem?",
    "How to make a paper snowflake?",
    "Why do onions make people cry?",
    "How do I convert Celsius to Fahrenheit?",
    "Can you suggest a reading list for a ten year old?",
    "What causes the seasons on Earth?",
    "How to start a vegetable garden on a balcony?",
    "Can you explain how vaccines train the immune system?",
    "Why do we yawn?",
    "How can I stay focused while studying?",
    "What is a healthy breakfast idea?",
    "Can you help me write a toast for my friend's wedding?",
    "How does a bicycle stay upright?",
    "What are the planets in our solar system?",
    "I received a gift card, how should I spend it wisely?",
    "Chatbot, can you recommend a relaxing song?",
    "Why don't penguins live at the North Pole?",
    "Describe the water cycle in simple words.",
    "Is it true that goldfish have short memories?",
    "Could you tell me about the history of the bicycle?",
    "What is the specific gravity of gold?",
    "Can you share a tip for keeping my desk tidy?",
    "I want to learn to draw, where should I start?",
    "How did the printing press change the world?",
    "What is the freezing point of salt water?",
    "How many legs does a spider have?",
    "What should I bring to a potluck dinner?",
    "How can I cut down on my electricity bill?",
    "Is it true that bananas are berries?",
    "How does a microwave oven heat food?",
    "What are the colors of the rainbow in order?",
    "Describe a walk along the beach at sunset.",
    "How do I pick a ripe avocado?",
    "What are some easy houseplants for beginners?",
    "Why do dogs wag their tails?",
    "What is the largest ocean on Earth?",
    "Can you help me plan meals for a busy week?",
    "How does a solar panel turn sunlight into power?",
    "What games can kids play at a birthday party?",
    "Why is drinking water important?",
    "How do I remove a coffee stain from a shirt?",
    "What is the difference between a frog and a toad?",
    "Can you give me ideas for a science fair project?",
    "How long should I boil an egg?",
    "Why do some trees lose their leaves in winter?",
    "What is a good gift for a friend who likes hiking?",
    "How do airplanes stay in the air?",
    "Is it safe to eat raw carrots every day?",
    "Chatbot, what is your favorite kind of cloud?",
    "How should I prepare for my first marathon?",
    "Which fruits are in season in summer?",
    "Why do we need sleep?",
    "Can you tell me how to make a fruit salad?",
    "How do I keep my bike chain clean?",
    "What is the story of the tortoise and the hare?",
    "How can I make friends in a new city?",
    "Why is the ocean salty?",
    "What are good habits for healthy teeth?",
    "How do I plan a small vegetable patch?",
    "What does a librarian do?",
    "Could you recommend a movie for a family night?",
    "How can I be more patient with my kids?",
    "What are the main parts of a computer?",
    "Why do cats like boxes?",
    "How can I learn to cook simple meals?",
    "What makes a good neighbor?",
    "How do I write a polite email to my landlord?",
    "Why does bread go stale?",
]

# Subjects for templated forms; each line is (activity, concept, thing).
_ACTIVITIES = [
    "learn to juggle", "make homemade pizza dough", "plant tulip bulbs", "train for a 5k race",
    "care for a houseplant", "knit a scarf", "build a bird feeder", "prepare for a job interview",
    "improve my sleep", "learn to swim", "paint a watercolor landscape", "write a short story",
    "organize a closet", "make fresh lemonade", "start journaling", "learn basic photography",
    "teach a dog to sit", "plan a road trip", "repot a cactus", "make a budget spreadsheet",
    "learn to meditate", "bake chocolate chip cookies", "study for a math exam", "fix a squeaky door",
    "make a kite", "grow tomatoes", "practice public speaking", "set up a home office",
    "learn the guitar chords", "cook rice on the stove", "clean a laptop keyboard", "start running",
    "write a birthday card", "decorate a small apartment", "make a compost bin", "learn sign language",
    "bake a banana bread", "learn to type faster", "make a family photo album", "wash a wool sweater",
    "plan a picnic", "learn to ice skate", "make a smoothie", "write a poem for my mother",
    "choose a good running shoe", "start a book club", "learn chess openings", "sharpen a kitchen knife",
    "make a paper lantern", "clean windows without streaks", "train for a long hike",
]
_CONCEPTS = [
    "gravity", "compound interest", "the water cycle", "how magnets work", "the immune system",
    "how airplanes fly", "the food chain", "how volcanoes erupt", "the speed of light",
    "how bees make honey", "the solar system", "how tides work", "how a battery stores energy",
    "the metric system", "how clouds form", "the history of chess", "how the internet works",
    "why stars twinkle", "how plants drink water", "the life cycle of a butterfly",
    "how a compass works", "how rainbows form", "what DNA is", "how earthquakes happen",
    "how a camera works", "the rules of basketball", "how bread rises", "how the heart pumps blood",
    "how wind turbines make electricity", "the phases of the moon", "how glaciers move",
    "how a piano makes sound", "the history of the Olympic games", "how recycling works",
    "how fireflies glow", "how a thermometer works", "the parts of a flower", "how coral reefs grow",
    "how a lock and key work", "how snowflakes form",
]
_THINGS = [
    "a sunrise", "a lighthouse", "a cup of coffee", "a mountain lake", "a library", "a garden in spring",
    "a rainy afternoon", "a friendly robot", "a snowy forest", "a busy market", "a sailing boat",
    "a quiet village", "an old oak tree", "a starry night", "a kitten", "a train journey",
    "a summer picnic", "a city park", "a hot air balloon", "a lazy Sunday",
]

_ACTIVITY_FORMS = [
    "How do I {x}?", "Can you help me {x}?", "What is the easiest way to {x}?",
    "Give me three tips to {x}.", "How to {x} as a beginner?", "I want to {x}, where do I begin?",
]
_CONCEPT_FORMS = [
    "Can you explain {x}?", "Explain {x} to a child.", "What should I know about {x}?",
    "Why is {x} important?", "Give me a short summary of {x}.",
]
_THING_FORMS = [
    "Write a short poem about {x}.", "Describe {x} in three sentences.", "Write a haiku about {x}.",
    "Tell me a cheerful story about {x}.",
]


def harmless_prompts() -> list[str]:
    """All harmless prompts, deduplicated, in a fixed order (the split is seeded later)."""
    prompts: list[str] = list(_WRITTEN)
    # Each subject appears in two forms chosen by position, so forms and subjects
    # vary together without a full cross product (which would be repetitive).
    for i, x in enumerate(_ACTIVITIES):
        for k in (0, 3):
            prompts.append(_ACTIVITY_FORMS[(i + k) % len(_ACTIVITY_FORMS)].format(x=x))
    for i, x in enumerate(_CONCEPTS):
        for k in (0, 2):
            prompts.append(_CONCEPT_FORMS[(i + k) % len(_CONCEPT_FORMS)].format(x=x))
    for i, x in enumerate(_THINGS):
        for k in (0, 1, 2):
            prompts.append(_THING_FORMS[(i + k) % len(_THING_FORMS)].format(x=x))
    seen: set[str] = set()
    unique = []
    for p in prompts:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique
