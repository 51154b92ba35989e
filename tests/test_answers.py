"""Answer extraction on completions written the way real models write them.

Run: pytest tests/test_answers.py --doctest-modules synthtune/data/answers.py

Each case is (completion, gold, expected extraction, expected correctness), labelled by hand the
way a human grader would read the completion.  The groups follow the kinds of models we score:
GSM8K-format fine-tunes, base models in few-shot mode (which ramble into a new "Question:"),
chat/instruct models (markdown, LaTeX, boxed answers), and truncated or marker-less outputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from synthtune.data.answers import (
    extract_answer,
    extract_flexible,
    extract_gold,
    extract_strict,
    is_correct,
    normalize_number,
    trim_completion,
)

NATALIA = (
    "Lena sold 48/2 = <<48/2=24>>24 stickers in June.\n"
    "Lena sold 48+24 = <<48+24=72>>72 stickers altogether in May and June.\n#### 72"
)
JANET_COT = (
    "Marta's hens lay 16 eggs per day. She eats 3 and bakes with 4, so 16 - 3 - 4 = 9 eggs are left. "
)
NEXT_Q = (
    "\n\nQuestion: A quilt needs 2 rolls of red thread and half that much gold thread. How many rolls?"
)

# --- GSM8K format (fine-tuned models reproduce "#### n") -------------------------------------------
GSM8K_FORMAT = [
    (NATALIA, "#### 72", "72", True),
    ("#### 72", 72, "72", True),
    ("Ravi earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
     "$<<0.2*50=10>>10.\n#### 10", "#### 10", "10", True),
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### $18", 18, "18", True),
    ("The total is 1,234 apples.\n#### 1,234", "#### 1234", "1234", True),
    ("####72", "72", "72", True),
    ("9 * 2 = 18\n#### 18.00", 18, "18", True),
    ("The temperature fell 12 - 17 = -5 degrees.\n#### -5", -5, "-5", True),
    (NATALIA + NEXT_Q, 72, "72", True),
    (NATALIA + "<|endoftext|>Question: Tom has 5 cats and 3 dogs. #### 8", 72, "72", True),
    ("Lena sold 48+24 = <<48+24=70>>70 stickers.\n#### 70", "#### 72", "70", False),
    ("#### **72**", 72, "72", True),
    ("#### 72 stickers", 72, "72", True),
    ("16 - 3 - 4 = <<16-3-4=9>>9\n9 * 2 = <<9*2=18>>18\n#### 18\n\n#### 18", 18, "18", True),
    ("#### 1,000,000.00", "#### 1,000,000", "1000000", True),
    ("Final answer: #### 18", 18, "18", True),
    ("The answer is 18.\n#### 20", 18, "20", False),  # the last explicit marker wins
    ("#### 18\n\nThe answer is 18", 18, "18", True),
    ("He needs 5 + 7 = <<5+7=12>>12 boxes.\n#### 12</s>", 12, "12", True),
    ("#### 0.5", "0.5", "0.5", True),
]

# --- lm-eval CoT style ("The answer is n.") and base models in few-shot mode -----------------------
THE_ANSWER_IS = [
    ("Lena sold 48 / 2 = 24 stickers in June. In total she sold 48 + 24 = 72 stickers. The answer is "
     "72.", 72, "72",
     True),
    ("Lena sold 48 / 2 = 24 stickers in June. In total she sold 48 + 24 = 72 stickers. The answer is 72.\n\n"
     "Q: Ravi earns $12 an hour for tutoring. Yesterday, he tutored for 50 minutes. How much "
     "did he "
     "earn?\nA: Ravi earns 12 / 60 = 0.2 dollars per minute. 0.2 * 50 = 10. The answer is "
     "10.", 72, "72", True),
    ("The total cost is 1,000 + 234.50 = 1,234.50. The answer is $1,234.50.", "1234.5", "1234.5", True),
    ("The answer is: 18", 18, "18", True),
    ("She makes 9 * 2 = 18 dollars. The answer is 18 dollars. Question: A quilt needs 2 rolls of red "
     "fiber.", 18,
     "18", True),
    ("The answer is 5.\n\nI hope this helps! Let me know if you have 2 more questions.", 5, "5", True),
    ("18 + 2 = 20. The answer is 20.", 20, "20", True),
    ("The prize is 10 * 100,000 = 1,000,000 dollars. The answer is $1,000,000.", "#### 1,000,000", "1000000",
     True),
    ("So the answer is 16 - 3 - 4 = 9 eggs * $2 = $18.", 18, "18", True),
    ("The balance is 10 - 15 = -5. The answer is -5.", -5, "-5", True),
    ("The answer is \u22125.", -5, "-5", True),
    ("She got 15 of 60 right, 15 / 60 = 0.25 = 25%. The answer is 25%.", 25, "25", True),
    ("Half of 3/2 is 3/4. The answer is 3/4.", "0.75", "0.75", True),
    ("The final answer is 18.", 18, "18", True),
    ("The answer to the question is 42.", 42, "42", True),
    ("10 / 3 = 3.333. The answer is approximately 3.33.", "3.33", "3.33", True),
    ("The answer is **72**.", 72, "72", True),
    ("The answer is 18 apples.", 18, "18", True),
    ("The answer is 18 (she sells 16 - 3 - 4 = 9 eggs at $2 each).", 18, "18", True),
    ("Therefore, the answer is 18 and not 20.", 18, "18", True),
    ("It takes 3 + 4 = 7 hours. the answer is 7 hours.", 7, "7", True),
    ("The answer is 5. Wait, that's wrong. 16 - 3 - 4 = 9, 9 * 2 = 18. The answer is 18.", 18, "18", True),
    ("The answer is 72\n\nQuestion 2: How many stickers did she sell in June? The answer is "
     "36.", 72, "72", True),
    ("25 / 2 = 12.5. The answer is 12.5 hours", "12.5", "12.5", True),
    ("The answer is 1,200.", "#### 1,200", "1200", True),
    ("The answer is $18.00", 18, "18", True),
    ("The answer is 18.0", "18", "18", True),
    ("She has 16 - 3 - 4 = 9 eggs left. 9 * 2 = 18. So the answer is", 18, "18", True),  # truncated
    ("So the answer is 18 + 2 = 20.", 20, "20", True),
    ("The answer is 10/2 = 5.", 5, "5", True),
    ("The answer is 5 * 3 = 15 cookies.", 15, "15", True),
    ("The answer is 15 cookies (5 * 3 = 15).", 15, "15", True),
    ("In total: 72 stickers. The answer is: **72 stickers**", 72, "72", True),
    ("The answer is not 20. The correct answer is 18.", 18, "18", True),
    ("The answer is $ 18", 18, "18", True),
    ("The answer is 5 apples and 3 oranges.", 5, "5", True),
    ("The answer is 3 hours and 20 minutes.", "#### 200", "3", False),
    ("The answer is 2021.", 2021, "2021", True),
    ("The answer is 18.5", 18, "18.5", False),
    ("The answer is 18.05", "18.05", "18.05", True),
    ("The answer is 18 dollars.Question: Tom has 5 cats. The answer is 5.", 18, "18", True),
    ("The answer is 18.\nQ: How many legs do 3 spiders have?\nA: 3 * 8 = 24. The answer is "
     "24.", 18, "18", True),
    ("Let's think step by step. 16 - 3 - 4 = 9. 9 * 2 = 18. The answer is 18.\n\nQuestion: John has 7 "
     "apples. "
     "He buys 5 more. How many does he have?\nLet's think step by step. 7 + 5 = 12. The answer is 12.", 18,
     "18", True),
    ("A: The answer is 18.", 18, "18", True),
    ("The answer is 18.<|im_end|>\n<|im_start|>user\nWhat about 20 eggs?", 18, "18", True),
    ("The answer is 18.\n\n### Instruction:\nNow solve: 25 + 7 = ?", 18, "18", True),
    ("Final Answer: The final answer is 18. I hope it is correct.", 18, "18", True),
    ("ANSWER: 18", 18, "18", True),
    ("answer = 18", 18, "18", True),
    ("Ans: 18", 18, "18", True),
    ("Ans. 18", 18, "18", True),
    ("The answer is eighteen.", 18, None, False),  # number words are not read
    ("The answer is eighteen. She had 16 eggs.", 18, "16", False),
    ("The answer is 50%", "0.5", "50", False),  # a percent is the bare number, as in GSM8K golds
    ("The answer is 0.75", "3/4", "0.75", True),
    ("The answer is 2/3 of the pie.", "2/3", "2/3", True),
    ("The answer would be 45 minutes.", 45, "45", True),
    ("I think the answer should be 12.", 12, "12", True),
    ("The answer is therefore 12.", 12, "12", True),
    ("So, the answer is: \n\n18", 18, "18", True),
]

# --- chat / instruct models: markdown --------------------------------------------------------------
MARKDOWN = [
    ("**Answer:** 72", 72, "72", True),
    ("**Final Answer:** 72", 72, "72", True),
    ("**Final Answer**: 72", 72, "72", True),
    ("### Final Answer\n\n72", 72, "72", True),
    ("### Final Answer\nThe final answer is $\\boxed{18}$.", 18, "18", True),
    ("Answer: 18", 18, "18", True),
    ("Answer: $18", 18, "18", True),
    ("Answer: 18 apples.", 18, "18", True),
    ("A: 18", 18, "18", True),
    ("A: 18 dollars", 18, "18", True),
    ("A: Lena sold 48/2 = 24 stickers in June.\nLena sold 48+24 = 72 stickers altogether in April and "
     "May.", 72,
     "72", True),
    ("Step 1: 16 - 3 - 4 = 9 eggs\nStep 2: 9 * $2 = $18\n\n**Answer: $18**", 18, "18", True),
    ("Marta's hens lay 16 eggs per day.\n\n1. She eats 3 eggs for breakfast.\n2. She bakes muffins with "
     "4 eggs."
     "\n3. Remaining eggs: 16 - 3 - 4 = 9.\n4. She sells them at $2 each: 9 \u00d7 $2 = "
     "$18.\n\n**Answer:** Marta "
     "makes **$18** every day at the farmers' market.", 18, "18", True),
    ("To solve this:\n\n- Eggs left: 16 - 3 - 4 = 9\n- Money: 9 * $2 = $18\n\nSo Marta makes $18 every "
     "day.", 18,
     "18", True),
    ("**Step 3:** Multiply: 9 \u00d7 2 = 18\n\n**Final answer: 18 dollars**", 18, "18", True),
    ("Total = **$1,234**", 1234, "1234", True),
    ("## Solution\n\n1. Stickers in June: 48 / 2 = 24\n2. Total: 48 + 24 = 72\n\n**Lena sold 72 stickers.**", 72,
     "72", True),
    ("| Month | Clips |\n|---|---|\n| April | 48 |\n| May | 24 |\n| Total | 72 |", 72, "72", True),
    ("Sure! Let's break it down.\n\n**Problem:** Marta has 16 eggs and uses 7.\n\n**Solution:** 16 - 7 = 9, "
     "9 * 2 = 18.\n\n**Answer:** 18", 18, "18", True),
    ("Answer: 5 (hours)", 5, "5", True),
    ("*Answer*: 18", 18, "18", True),
    ("> **Answer:** `18`", 18, "18", True),
    ("**The answer is 18.**", 18, "18", True),
    ("Answer: Let's compute. 16 - 3 - 4 = 9 eggs. 9 * 2 = 18.", 18, "18", True),
    ("**Answer:**\n\n$18", 18, "18", True),
    ("Final answer\n---\n18", 18, "18", True),
]

# --- LaTeX -----------------------------------------------------------------------------------------
LATEX = [
    ("\\boxed{72}", 72, "72", True),
    ("$\\boxed{72}$", 72, "72", True),
    ("The final answer is $\\boxed{72}$. I hope it is correct.", 72, "72", True),
    ("\\[\n\\boxed{18}\n\\]", 18, "18", True),
    ("\\(\\boxed{\\$18}\\)", 18, "18", True),
    ("\\boxed{18 \\text{ dollars}}", 18, "18", True),
    ("\\boxed{\\text{18 apples}}", 18, "18", True),
    ("\\boxed{1{,}234}", 1234, "1234", True),
    ("\\boxed{1\\,234}", 1234, "1234", True),
    ("\\boxed{\\frac{3}{4}}", "0.75", "0.75", True),
    ("\\boxed{\\dfrac{1}{3}}", "0.33", "1/3", False),  # 1/3 is exact, so it is not a rounded 0.33
    ("\\boxed{x = 5}", 5, "5", True),
    ("\\boxed{16 - 3 - 4 = 9}", 9, "9", True),
    ("First I got \\boxed{20}, but 16 - 3 - 4 = 9 and 9 * 2 = 18, so \\boxed{18}.", 18, "18", True),
    ("\\[ 9 \\times 2 = 18 \\]\nTherefore Marta makes \\(\\boxed{18}\\) dollars.", 18, "18", True),
    ("\\boxed{18\\%}", 18, "18", True),
    ("\\boxed{-5}", -5, "-5", True),
    ("\\boxed 72", 72, "72", True),
    ("So she makes $\\$18$ per day.", 18, "18", True),
    ("the answer is \\(18\\)", 18, "18", True),
    ("The total is \\(\\frac{72}{4} = 18\\).", 18, "18", True),
    ("\\[ 16 - 3 - 4 = 9 \\]\n\\[ 9 \\cdot 2 = 18 \\]", 18, "18", True),
    ("$$\\text{Total} = 48 + 24 = 72$$", 72, "72", True),
    ("The final answer is: $\\boxed{\\$1,234.50}$", "1234.50", "1234.5", True),
    ("\\boxed{\\textbf{72}}", 72, "72", True),
    ("The answer is $\\frac{5}{2}$.", "2.5", "2.5", True),
    ("\\boxed{}\n\nSo she sold 72 stickers.", 72, "72", True),  # an empty box is no answer
    ("**Final Answer**\n\\[\n\\boxed{72}\n\\]", 72, "72", True),
]

# --- no marker: last number, truncation, odd endings ----------------------------------------------
FALLBACK = [
    (JANET_COT + "She sells them for 9 * 2 = 18 dollars", 18, "18", True),
    ("She sold 48/2 = 24 stickers in June. Altogether she sold 48 + 24 = ", 72, "24", False),  # cut before answer
    (JANET_COT + "so she makes 9 * 2 = 18 dol", 18, "18", True),
    ("Eggs left: 16 - 3 - 4 = 9. So the total is 18.\n\nStep 3:", 18, "18", True),
    ("Step 1: 16 - 3 - 4 = 9\nStep 2: 9 * 2 = 18\nStep 3", 18, "18", True),
    ("1. Marta has 16 eggs.\n2. She eats 3 and bakes 4: 16 - 3 - 4 = 9.\n3. She sells 9 \u00d7 $2 = "
     "$18.\n4.", 18,
     "18", True),
    ("72.", 72, "72", True),
    ("Total stickers:\n72.", 72, "72", True),
    ("She earns 9 * 2 = $18 every day.\n\nDate: 2023-10-05", 18, "18", True),
    ("Marta makes 9 * 2 = $18.\n\nPosted on March 5, 2021", 18, "18", True),
    ("She has earned $18 per day as of 12/05/2021.", 18, "18", True),
    ("She scored 18 points and finished 3rd.", 18, "18", True),
    ("He earns $18 by the 5th day.", 18, "18", True),
    ("She leaves at 3:30 pm with 18 apples and arrives at 4:15 pm.", 18, "18", True),
    ("I'm sorry, I can't solve this problem.", 18, None, False),
    ("", 18, None, False),
    ("It will take her 120/24 = 5 hours to read 120 pages.", 5, "5", True),
    ("She has 5 + 3 = 8 apples, then gives 2 away, so she has 6", 6, "6", True),
    ("Thus, the three take 24+26+21=71 seconds to run the 600-meter relay race.", 71, "71", True),
    ("There are 5*20 = 100 tanks. Altogether, there are 100+20 = 120 trucks and tanks in the "
     "yard.", 120, "120",
     True),
    ("She needs 40/10 = 4 packs of 10 cupcakes.", 4, "4", True),
    ("He walks 3*30 = 90 miles in 30 days", 90, "90", True),
    ("18\n\nQuestion: Tom has 12 marbles and loses 5. How many are left?", 18, "18", True),
    ("Answer: 18\n\nProblem: Tom has 12 marbles and loses 5.", 18, "18", True),
    ("She makes 9 * 2 = 18 dollars.</s>Question: What is 20 + 5?", 18, "18", True),
    ("She makes 18 dollars.\n\nUser: thanks! Can you do 25 + 7?", 18, "18", True),
    ("She makes 18 dollars.\n\nHuman: And if she had 20 eggs?", 18, "18", True),
    ("Question: Marta's hens lay 16 eggs. She eats 3 and bakes with 4. How much does she make at $2 an "
     "egg?\n"
     "Answer: 18", 18, "18", True),
    ("Problem: Marta's hens lay 16 eggs per day.\nSolution: 16 - 3 - 4 = 9, and 9 * 2 = 18.\nThe answer "
     "is 18.",
     18, "18", True),
    ("Total: $1,000,000", 1000000, "1000000", True),
    ("The city has 1,234,567 people.", 1234567, "1234567", True),
    ("The cost is $0.50.", "0.5", "0.5", True),
    ("She has 18.00 dollars left.", 18, "18", True),
    ("The temperature dropped to -5 degrees.", -5, "-5", True),
    ("Solving, x = -5", -5, "-5", True),
    ("He has 10-5=5 left.", 5, "5", True),
    ("The total is \u20b91,00,000.", 100000, "100000", True),
    ("The price is \u20ac18.", 18, "18", True),
    ("It costs \u00a318", 18, "18", True),
    ("0.1 + 0.2 = 0.3", "0.3", "0.3", True),
    ("She needs 5 buses.\n", 5, "5", True),
    ("He arrives at 10:30, after driving 45 miles.", 45, "45", True),
    ("She was born in 1995.", 1995, "1995", True),
    ("She had 18 apples on March 5.", 18, "18", True),
    ("Step 2: 9 * 2 = 18\n\nStep 3: Final answer\n", 18, "18", True),
    ("He paid $3.50 for each of the 4 items, so 4 * 3.5 = $14 in total.", 14, "14", True),
    ("A car at 60 mph for 2.5 hours goes 60 * 2.5 = 150 miles.", 150, "150", True),
    ("The rectangle is 12 x 4 = 48 square feet.", 48, "48", True),
    ("The rectangle is 12 \u00d7 4 = 48 square feet.", 48, "48", True),
    ("So 16 - 3 - 4 = 9 eggs, 9 * 2 = 18", 18, "18", True),
    ("Let x be her age. Then 2x + 3 = 15, so x = 6.", 6, "6", True),
    ("She bought 3 packs of 12 = 36 pencils.", 36, "36", True),
    ("So, 20% of 50 = 10 students.", 10, "10", True),
    ("She ran 5 km, 10 km and 3.5 km: 18.5 km in total.", "18.5", "18.5", True),
    ("She spent 2 1/2 hours.", "2.5", "0.5", False),  # mixed numbers are not read: documented
    ("$18", 18, "18", True),
    ("   18   ", 18, "18", True),
    ("18 \n\n\n", 18, "18", True),
    ("Marta has 16 eggs. She sells 9 and keeps the rest", 7, "9", False),
    ("The result: 3 x 4 = 12, then 12 + 6 = 18.\n\nThanks for asking! \U0001f60a", 18, "18", True),
    ("They need 12 / 4 = 3 cars.\n\n---\n\n**Question 2**: How many seats?", 3, "3", True),
    ("Each costs $2.50, so 4 cost 4 * 2.5 = 10.", 10, "10", True),
    ("The ratio is 2:3, so boys are 2/5 * 30 = 12.", 12, "12", True),
    ("12 + 6 = 18 apples\n", 18, "18", True),
    ("The final count is (16 - 3 - 4) * 2 = 18.", 18, "18", True),
    ("H2O has 3 atoms; 5 molecules have 15 atoms.", 15, "15", True),
    ("The house sold for $1.5 million.", 1500000, "1500000", True),
    ("The answer is 2 thousand.", "#### 2,000", "2000", True),
]

# --- failure modes of small models: loops cut by the token limit, hypotheses, headings -------------
SMALL_MODELS = [
    ("The answer is 18.\nThe answer is 18.\nThe answer is 18.\nThe answer is 1", 18, "18", True),
    ("So she makes 9 * 2 = 18 dollars. So she makes 9 * 2 = 18 dollars. So she makes 9 * 2 = "
     "1", 18, "18", True),
    ("The answer is 125. The answer is 12", 125, "125", True),
    ("So she makes 9 * 2 = $18 a day. The answer is 18.\n\nSo she makes 9 * 2 = $18 a day. The answer is 1",
     18, "18", True),
    # a loop of two: the same clause leads to both numbers
    ("The answer is $18 per day. The answer is $1", 18, "18", True),
    ("The answer is 18 dollars.\nThe answer is 1", 18, "18", True),
    ("She sells 9 eggs. She makes 9 * 2 = 18 dollars. She makes 9 * 2 = 1", 18, "18", True),
    # No loop: other clauses lead to the two answers. A completion whose stop string was removed
    # (Sample.text) ends in a number like a cut-off one, and these changed their minds.
    ("I first thought the answer is 12, but 3 - 2 = 1, so the answer is 1", 1, "1", True),
    ("The answer is 12.\n\nWait, let me check again: 15 - 14 = 1. The answer is 1", 1, "1", True),
    ("Sam has 18 cats, so the answer is 18. Then he sells 17, and the answer is 1", 1, "1", True),
    # a zero denominator is no number: neither its numerator nor the number before it is the answer
    ("The answer is 5/0.", None, None, False),
    ("Step 1: 10 - 3 = 7. So 5/0", None, None, False),
    ("Step 1: 10 - 3 = 7. So 5/" + "0" * 5000, None, None, False),  # int() of 5,000 zeros raised
    # A newline after the number means generation stopped there: the number is whole.
    ("The answer is 18.\nThe answer is 1\n", 1, "1", True),
    ("If the answer is 10, then 10 * 2 = 20 eggs, which is too many. So she makes 9 * 2 = "
     "18.", 18, "18", True),
    ("Suppose the answer is 5. Then 5 + 3 = 8, not 9. So it must be 6.", 6, "6", True),
    ("#### 1. Understand the problem\nMarta has 16 eggs.\n#### 2. Compute\n16 - 3 - 4 = 9, 9 * 2 = 18", 18,
     "18", True),
    ("#### Step 1\n16 - 3 - 4 = 9\n#### Step 2\n9 * 2 = 18\n#### 18", 18, "18", True),
    ("The answer is 18\n\n\n\n\n\n\n\n", 18, "18", True),
    ("18 18 18 18 18 18 18 18 18 18 18 18 18 18 18 18 1", 18, "18", True),
]

CASES = GSM8K_FORMAT + THE_ANSWER_IS + MARKDOWN + LATEX + FALLBACK + SMALL_MODELS


def test_table_is_large_and_unique():
    assert len(CASES) >= 150
    completions = [c for c, *_ in CASES]
    assert len(set(completions)) == len(completions), "duplicate completion in the table"


@pytest.mark.parametrize(("completion", "gold", "expected", "correct"), CASES, ids=range(len(CASES)))
def test_extract_answer_table(completion, gold, expected, correct):
    assert extract_answer(completion) == expected
    assert is_correct(completion, gold) is correct


# --- strict and flexible: our own, by value (lm-eval's string-match figures: test_lmeval_gsm8k.py) ---

@pytest.mark.parametrize(
    ("completion", "strict", "flexible"),
    [
        (NATALIA, "72", "72"),
        ("The answer is 72.", None, "72"),
        ("#### 5\n#### 6", "5", "6"),  # the first "####" counts (as in lm-eval's strict-match)
        (NATALIA + NEXT_Q, "72", "72"),  # the hallucinated question's "2" does not count
        ("#### $1,234", "1234", "1234"),  # by value: lm-eval's strict-match finds nothing here
        ("The answer is 18.\n\nStep 3:", None, "3"),  # flexible skips nothing
        ("No numbers here.", None, None),
        ("\\boxed{18}", None, "18"),
    ],
)
def test_strict_and_flexible(completion, strict, flexible):
    assert extract_strict(completion) == strict
    assert extract_flexible(completion) == flexible


def test_non_string_completions_are_not_answers():
    for value in (None, 18, ["18"]):
        assert extract_answer(value) is None  # type: ignore[arg-type]
        assert extract_strict(value) is None  # type: ignore[arg-type]
        assert extract_flexible(value) is None  # type: ignore[arg-type]
        assert is_correct(value, 18) is False  # type: ignore[arg-type]


# --- normalize_number and extract_gold ---------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("18", "18"), ("18.0", "18"), ("18.00", "18"), ("$18", "18"), ("$18.", "18"), ("18.", "18"),
        ("1,234.50", "1234.5"), ("1,234,567", "1234567"), ("-0", "0"), ("-0.0", "0"), ("\u22125", "-5"),
        ("-5", "-5"), ("+5", "5"), ("$-5", "-5"), ("-$5", "-5"), ("25%", "25"), ("3/4", "0.75"),
        ("-3/4", "-0.75"), ("2/6", "1/3"), ("10/5", "2"), ("18 apples.", "18"), ("5 hours", "5"),
        (" 72 ", "72"), ("**72**", "72"), ("0.1", "0.1"), (".5", "0.5"), ("007", "7"), ("1e3", None),
        ("1/0", None), ("", None), ("eighteen", None), ("18 and 20", None), ("18-20", None), ("abc 18", None),
        ("100000000000000000000001", "100000000000000000000001"), ("0.125", "0.125"), ("1/8", "0.125"),
        ("\u20ac18", "18"), ("$ 18", "18"), ("1,000,000.00", "1000000"), ("3.14159", "3.14159"),
        ("$1.5 million", "1500000"), ("2 Billion dollars", "2000000000"),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_normalize_number_is_exact_for_floats_and_ints():
    assert normalize_number(0.1) == "0.1"  # not 0.1000000000000000055511151231257827
    assert normalize_number(18.0) == "18"
    assert normalize_number(-0.0) == "0"
    assert normalize_number(7) == "7"
    assert normalize_number(float("nan")) is None
    assert normalize_number(float("inf")) is None
    assert normalize_number(True) is None  # bool is an int subclass, not a number here


@pytest.mark.parametrize(
    ("gold", "expected"),
    [
        (NATALIA, "72"), ("#### 1,234", "1234"), ("#### -5", "-5"), ("#### $18", "18"), (72, "72"),
        (18.5, "18.5"), (" 72 ", "72"), ("72", "72"), ("#### 72\n", "72"), ("a #### 1 #### 2", "2"),
        ("no answer here", None), ("####", None), (None, None), (True, None), ("#### 18 apples", "18"),
        # past the number, a unit (with its exponent) is read past, but a line with another number
        # is no gold (a data file with one is refused with its line), never its first number
        ("#### 1 1/2", None), ("#### 5/0", None), ("#### 3/4", "0.75"), ("#### 25 m^2", "25"),
        ("#### 25 m\u00b2", "25"), ("#### 3 and 1/2", None), ("#### 3 hours 20 minutes", None),
        ("#### 4:30", None), ("#### 10 - 2 = 8", None), ("#### 12 or 13", None),
    ],
)
def test_extract_gold(gold, expected):
    assert extract_gold(gold) == expected


def test_is_correct_compares_numbers_not_text():
    assert is_correct("The answer is 18.00", "#### 18")
    assert is_correct("The answer is $1,234.50.", 1234.5)
    assert is_correct("#### 0.30", "0.3")
    assert not is_correct("The answer is 18", "#### 17")
    assert not is_correct("The answer is 18", "no gold")  # an unparsable gold is never matched


def test_trim_completion():
    assert trim_completion("The answer is 18." + NEXT_Q) == "The answer is 18."
    # Nothing numeric before the label: it is the model restating the problem, not a new one.
    echo = "Question: Marta has 16 eggs.\nAnswer: 18"
    assert trim_completion(echo) == echo
    assert trim_completion("18<|eot_id|>garbage 99") == "18"
    assert trim_completion("any questions: 5 more") == "any questions: 5 more"  # lower case is prose


# --- the real GSM8K, when this machine has it ---------------------------------------------------------

def _gsm8k_dir() -> Path:
    value = os.environ.get("SYNTHTUNE_GSM8K_DIR")
    path = Path(value) if value else Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k"
    if not (path / "train.jsonl").exists():
        pytest.skip(f"GSM8K not found at {path} (set SYNTHTUNE_GSM8K_DIR)")
    return path


def _rows(split: str) -> list[dict]:
    with open(_gsm8k_dir() / f"{split}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_gsm8k_gold_parses_and_matches_itself(split):
    rows = _rows(split)
    assert len(rows) == {"train": 7473, "test": 1319}[split]
    bad = [r["answer"][-40:] for r in rows if extract_gold(r["answer"]) is None]
    assert not bad
    mismatched = [r["answer"][-40:] for r in rows if not is_correct(r["answer"], r["answer"])]
    assert not mismatched
    assert all(extract_strict(r["answer"]) == extract_gold(r["answer"]) for r in rows)


def test_gsm8k_solutions_without_the_final_line_mostly_end_in_the_answer():
    # With "#### n" and the annotations removed, a reference solution is a marker-less chain of thought:
    # the fallback must find the gold in nearly all of them (measured: 99.1%; plain last number: 97.2%).
    import re

    rows = _rows("train") + _rows("test")
    hits = 0
    for row in rows:
        prose = re.sub(r"<<[^<>]*>>", "", row["answer"].rsplit("####", 1)[0])
        hits += extract_answer(prose) == extract_gold(row["answer"])
    assert hits / len(rows) >= 0.985
