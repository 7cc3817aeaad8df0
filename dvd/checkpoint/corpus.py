"""A small English text the test tokenizer's BPE merges are learned from (written for this
project, so that no data set has to be downloaded). Changing it changes every token id of
the tiny tokenizer: keep it fixed.
"""

CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words, and a
model that reads pictures has to turn every one of them into words it can think with.
This is a small text written to train a small tokenizer. It talks about images, about
language, about servers and about the weather, so that the common pieces of English are
learned as whole tokens while rare words are still spelled out byte by byte.

What is in this image? The image shows a red car parked in front of a white house. There
is a tree on the left side of the picture and two people walking on the road. The sky is
blue with a few clouds. Describe the image in detail. Please describe what you see.
How many people are in the photo? There are three people in the photo: a man, a woman and
a child. The child is holding a yellow balloon. What color is the cat? The cat is black
and white, and it is sleeping on a green chair next to the window.

Hello! How can I help you today? I would like to know what time it is in Paris. It is
about three o'clock in the afternoon. Thank you very much. You are welcome. Could you
tell me a short story? Once upon a time there was a little robot who wanted to see the
sea. Every morning it looked at the map on the wall and counted the days. One day it
walked out of the door, followed the river and found the beach. The water was cold and
bright, and the robot was happy.

The vision encoder turns each tile of the image into features. A tile is 448 by 448
pixels, cut into patches of 14 by 14 pixels, which gives 1024 patches and one class token.
After the pixel shuffle every tile becomes 256 tokens for the language model. The language
model reads the text tokens and the image tokens together and writes the answer one token
at a time. The server that runs the vision encoder and the server that runs the language
model can live on different machines, and the features travel between them over the
network. When many requests arrive at the same time, the servers batch them together so
that the hardware stays busy.

Numbers and code: 0 1 2 3 4 5 6 7 8 9 10 12 16 32 64 100 128 256 448 512 1000 1024 2048.
def main(): return 0. for i in range(10): print(i). x = y + 1; if x > 2: stop.
{"name": "value", "id": 42, "ok": true}. The answer is 7. The total is 3.5 dollars.
Email me at the address below, or call the number on the card. Open the file, read the
first line, and close it again. Then run the test and check that it passes.

The weather today is sunny and warm, with a light wind from the west. Tomorrow it will
rain in the morning and clear up in the evening. In winter the days are short and the
nights are long; in summer the evenings are light until late. People like to walk in the
park when the weather is good, and they stay at home and read when it is cold and wet.

Questions people often ask: Where is the nearest train station? Which way is the museum?
When does the shop open? Why is the sky blue? Because the air scatters blue light more
than red light. What does this sign say? It says that the road is closed for repairs.
Can you read the text in this picture? The text reads "Welcome to the city library".
Is there a dog in the image? No, there is no dog, but there is a bird on the fence.

Summary: the model looks at the picture, reads the question, and answers in plain words.
It should be helpful, honest and short when a short answer is enough, and it should say
so when it does not know. Good answers explain their reasons; good questions are clear.
Let us think step by step. First, find the objects. Second, count them. Third, answer.
The first step is the hardest, the second is easy, and the third is the one that matters.
"""
