"""Short English sentences (assistant commands, news, facts): calibration and evaluation text for MiniLM int8."""

SENTENCES = [
    "turn off the kitchen lights", "what is the weather like in paris tomorrow", "set an alarm for seven in the morning",
    "the quick brown fox jumps over the lazy dog", "how do I reset my password", "play some jazz music in the living room",
    "machine learning models can run on small devices", "remind me to call my mother on sunday",
    "the train to berlin is delayed by twenty minutes", "can you recommend a good italian restaurant nearby",
    "I would like to book a flight to tokyo", "the stock market fell sharply today", "please lower the thermostat by two degrees",
    "who won the football match last night", "translate hello into spanish", "the battery on my phone drains too quickly",
    "open the garage door", "what time does the pharmacy close", "a cat sleeps on the warm windowsill",
    "quantum computers use qubits instead of bits", "add milk and eggs to my shopping list", "the museum is closed on mondays",
    "how many calories are in a banana", "start a timer for ten minutes", "my order has not arrived yet",
    "the river flooded after heavy rain", "show me photos from last summer", "the meeting was moved to thursday afternoon",
    "is it going to snow this weekend", "lock the front door", "the new library opens next month",
    "send a message to john saying I am running late", "how far is the moon from the earth",
    "the recipe calls for two cups of flour", "switch the tv to channel five", "the concert was cancelled due to illness",
    "find a parking spot near the stadium", "our team shipped the release on friday", "what does this error message mean",
    "dim the bedroom lights to thirty percent",
]

# held out: never used for calibration (the issue asks for >= 50 real sentences in the evaluation)
EVAL_SENTENCES = [
    "turn on the porch light when it gets dark", "how long does it take to boil an egg", "close the living room blinds",
    "what is the capital of australia", "set the oven to two hundred degrees", "play the latest episode of my podcast",
    "is the dishwasher finished yet", "the children are walking to school", "call the plumber tomorrow morning",
    "how tall is the eiffel tower", "read me today's headlines", "the garden needs watering after this heat",
    "pause the music", "what is on my calendar for tomorrow", "the bus was full this morning",
    "make the bathroom fan run for fifteen minutes", "how do you say thank you in japanese", "my laptop will not turn on",
    "the bakery sells fresh bread every morning", "turn the volume down a little", "when is the next full moon",
    "the package was left at the front door", "cancel my alarm for tomorrow", "the dog is barking at the mailman",
    "how many ounces are in a pound", "switch off all the lights downstairs", "the team celebrated their victory",
    "water boils at one hundred degrees celsius", "remind me to take out the trash tonight", "a storm is approaching the coast",
    "what song is playing right now", "the elevator is out of order", "set the living room temperature to twenty one",
    "she planted tomatoes in the backyard", "is there any coffee left", "the flight landed ahead of schedule",
    "show the front door camera on the tv", "how do I make pancakes", "the printer is out of paper",
    "the city opened a new bike lane", "unlock the back door for the cleaner", "what is the population of canada",
    "the smoke alarm battery is low", "read my new messages", "the library extended its opening hours",
    "turn on the humidifier in the nursery", "how much does a new passport cost", "the sun sets earlier in winter",
    "skip to the next song", "our neighbours are having a party tonight",
]


def minilm_samples(texts=SENTENCES) -> list[dict]:
    """Feed dicts for zoo:minilm from real text (needs the real weights' tokenizer)."""
    from edgellm.zoo import minilm

    ids, mask = minilm.tokenize(list(texts), minilm.model_dir())
    return [{"input_ids": ids[i : i + 1].numpy(), "attention_mask": mask[i : i + 1].numpy()} for i in range(len(texts))]
