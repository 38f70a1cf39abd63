"""
The hidden tier: the handout's TODOs tested again on shapes, seeds and answers that the public tests
(course/tests/checks.py) do not show. Only the grader has this file (make_autograder.py puts it in
Gradescope's package, make_starter.py never ships it); its tests are shown after the grades are
published, and worth checks.HIDDEN's points.
"""

from checks import (Test, accuracy_check, check_dropout, check_eval, check_forward, check_init, check_only_lora_trains,
                    check_train_unmerges, forward_inputs, init_inputs, lora_inputs)

ANSWERS = {"answers_Good": " Good"}  # more files: a model that answers this
TESTS = [
    Test("LoRALinear.__init__", "init on a wide layer of rank 5", "init_layer", init_inputs(10, 7, 5, 3.0), check_init,
         hidden=True),
    Test("LoRALinear.forward", "forward on another shape and scaling", "forward",
         forward_inputs((4, 3, 9), out_f=7, in_f=9, rank=3, scaling=1.7), check_forward, hidden=True),
    Test("LoRALinear.forward", "dropout of 0.3 on another shape", "forward",
         forward_inputs((5, 9), out_f=7, in_f=9, rank=3, dropout=0.3), check_dropout, hidden=True),
    Test("LoRALinear.train", "train un-merges a layer of rank 4", "train_merged",
         lambda g, f: lora_inputs(g, 8, 11, 4, 2.5), check_train_unmerges, hidden=True),
    Test("LoRALinear.eval", "eval three times merges a layer of rank 4 once", "eval_layer",
         lambda g, f: lora_inputs(g, 8, 11, 4, 2.5, times=3), check_eval, hidden=True),
    Test("mark_only_lora_as_trainable", "only lora matrices train in a wider model", "mark_only",
         lambda g, f: lora_inputs(g, 9, 12, 3, 1.0, vocab=17), check_only_lora_trains, hidden=True),
    Test("ModelSampler.get_accuracy", "a capitalised label word reads as that label", "accuracy",
         lambda g, f: dict(model_dir=f["answers_Good"], reviews_dir=f["reviews_dir"], template="bare",
                           label_words="bad,good"),
         accuracy_check((0.5, 12, 0), "' Good' reads as the label word 'good' (case aside)"), hidden=True),
]
