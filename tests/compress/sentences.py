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


def minilm_samples(texts=SENTENCES) -> list[dict]:
    """Feed dicts for zoo:minilm from real text (needs the real weights' tokenizer)."""
    from edgellm.zoo import minilm

    ids, mask = minilm.tokenize(list(texts), minilm.model_dir())
    return [{"input_ids": ids[i : i + 1].numpy(), "attention_mask": mask[i : i + 1].numpy()} for i in range(len(texts))]
