"""Every benchmark read from small files written here in its published layout, scored with a scripted answer
function whose result is known, and its bad-data errors (one line, naming the file and line)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from media_files import ramp_tone, write_audio, write_image, write_video

from vita.eval.answer import Answer, Query
from vita.eval.core import run
from vita.eval.registry import NAMES, get
from vita.training.data import DataError, load_audio_ref


def answer_by(table: dict[str, str], key=lambda q: q.text):
    """A scripted model: looks the query up (by `key`) and answers from the table; unknown queries get ''."""
    return lambda query: table.get(key(query), "")


def one_line_error(benchmark: str, data: Path) -> str:
    with pytest.raises(DataError) as error:
        run(get(benchmark), data, answer_by({}))
    assert "\n" not in str(error.value)
    return str(error.value)


def test_every_cli_name_has_a_benchmark() -> None:
    assert NAMES == ("curriculum", "librispeech", "wenetspeech", "mme", "ocrbench", "hallusionbench", "videomme",
                     "ceval", "agieval", "mmlu", "gsm8k")
    assert all(get(name).name == name for name in NAMES)


# ---------------------------------------------------------------------------------------------------------------
# LibriSpeech and WenetSpeech


def _librispeech(root: Path) -> Path:
    chapters = {("test-clean", "1089", "134686"): ["HE HOPED THERE WOULD BE STEW FOR DINNER", "STUFF IT INTO YOU"],
                ("test-other", "1688", "142285"): ["THERE'S IRON THEY SAY IN ALL OUR BLOOD"],
                ("train-clean-100", "103", "1240"): ["CHAPTER ONE MISSUS RACHEL LYNDE IS SURPRISED"]}
    for (split, speaker, chapter), texts in chapters.items():
        folder = root / "LibriSpeech" / split / speaker / chapter
        lines = []
        for k, text in enumerate(texts):
            utterance = f"{speaker}-{chapter}-{k:04d}"
            write_audio(folder / f"{utterance}.flac", ramp_tone(0.5))
            lines.append(f"{utterance} {text}\n")
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))
    return root / "LibriSpeech"


def test_librispeech_wer_per_split(tmp_path: Path) -> None:
    root = _librispeech(tmp_path)
    answers = {"1089-134686-0000": "he hoped there would be stew for dinner",  # 0 errors of 8
               "1089-134686-0001": "stuff it in you",  # 1 substitution of 4
               "1688-142285-0000": "there's iron they say in all our blood"}  # 0 of 8
    result = run(get("librispeech"), root, answer_by(answers, key=lambda q: Path(q.audio[0]).stem))
    assert result.metrics["wer"] == pytest.approx(1 / 20)
    assert result.metrics["test-clean/wer"] == pytest.approx(1 / 12)
    assert result.metrics["test-other/wer"] == 0.0
    assert [i["split"] for i in result.items] == ["test-clean", "test-clean", "test-other"]  # no training split
    # One split only, and --limit.
    assert len(run(get("librispeech"), root / "test-clean", answer_by({}), limit=1).items) == 1


def test_librispeech_reads_a_training_split_only_when_given(tmp_path: Path) -> None:
    root = _librispeech(tmp_path)
    assert [i["split"] for i in run(get("librispeech"), root / "train-clean-100", answer_by({})).items] == \
        ["train-clean-100"]
    for split in ("test-clean", "test-other"):
        shutil.rmtree(root / split)
    assert one_line_error("librispeech", root) == (
        f"{root}: no dev-clean, dev-other, test-clean, test-other split here (a training split is read only when "
        "its directory is given)")


def test_librispeech_bad_data(tmp_path: Path) -> None:
    root = _librispeech(tmp_path)
    trans = root / "test-clean" / "1089" / "134686" / "1089-134686.trans.txt"
    (trans.parent / "1089-134686-0001.flac").unlink()
    assert one_line_error("librispeech", root).startswith(f"{trans}:2: audio file not found")
    trans.write_text("1089-134686-0000\n")
    assert one_line_error("librispeech", root) == f"{trans}:1: expected 'UTTERANCE-ID TRANSCRIPT'"


def test_wenetspeech_cer_on_the_test_subsets(tmp_path: Path) -> None:
    write_audio(tmp_path / "audio" / "test_net" / "N0001.opus", ramp_tone(6.0))
    write_audio(tmp_path / "audio" / "test_meeting" / "M0001.opus", ramp_tone(4.0))
    doc = {"audios": [
        {"aid": "N0001", "path": "audio/test_net/N0001.opus", "duration": 6.0, "segments": [
            {"sid": "N0001_S0", "begin_time": 0.0, "end_time": 2.0, "text": "今天天气很好", "subsets": ["TEST_NET"]},
            {"sid": "N0001_S1", "begin_time": 2.0, "end_time": 5.5, "text": "我们去公园", "subsets": ["L"]}]},
        {"aid": "M0001", "path": "audio/test_meeting/M0001.opus", "duration": 4.0, "segments": [
            {"sid": "M0001_S0", "begin_time": 1.0, "end_time": 3.0, "text": "开会了", "subsets": ["TEST_MEETING"]}]}]}
    (tmp_path / "WenetSpeech.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1))
    seen = []

    def model(query: Query) -> str:
        seen.append(query)
        return {"N0001_S0": "今天天气很好。", "M0001_S0": "开会"}[next(
            s for s, a in (("N0001_S0", "N0001.opus#t=0,2"), ("M0001_S0", "M0001.opus#t=1,3"))
            if query.audio[0].endswith(a))]

    result = run(get("wenetspeech"), tmp_path, model)
    assert [i["id"] for i in result.items] == ["N0001_S0", "M0001_S0"]  # the L segment is not a test one
    assert result.metrics["test_net/cer"] == 0.0
    assert result.metrics["test_meeting/cer"] == pytest.approx(1 / 3)
    assert result.metrics["cer"] == pytest.approx(1 / 9)
    assert abs(len(load_audio_ref(seen[1].audio[0])) / 16000 - 2.0) < 0.01  # the model gets the segment

    doc["audios"] = doc["audios"][:1]
    doc["audios"][0]["segments"] = doc["audios"][0]["segments"][1:]
    (tmp_path / "WenetSpeech.json").write_text(json.dumps(doc, ensure_ascii=False))
    assert "no segment is in the TEST_NET or TEST_MEETING subset" in one_line_error("wenetspeech", tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# MME, OCRBench, HallusionBench, Video-MME


def _mme(root: Path) -> Path:
    release = root / "MME_Benchmark_release_version"
    # A category laid out flat (images and .txt side by side) ...
    for stem, qa in {"000000006040": [("Is there a train in this image? Please answer yes or no.", "Yes"),
                                      ("Is there a bed in this image? Please answer yes or no.", "No")],
                     "000000018150": [("Is there a bottle in this image? Please answer yes or no.", "Yes"),
                                      ("Is there a scissors in this image? Please answer yes or no.", "No")]}.items():
        write_image(release / "existence" / f"{stem}.jpg")
        (release / "existence" / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in qa))
    # ... and one with images/ and questions_answers_YN/.
    write_image(release / "artwork" / "images" / "10002.jpg")
    (release / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (release / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Does this artwork exist in the form of painting? Please answer yes or no.\tYes\n"
        "Does this artwork exist in the form of glassware? Please answer yes or no.\tNo\n")
    write_image(release / "code_reasoning" / "0001.png")
    (release / "code_reasoning" / "0001.txt").write_text("Is the output 7? Please answer yes or no.\tYes\n"
                                                         "Is the output 8? Please answer yes or no.\tNo\n")
    return release


def test_mme_scores_acc_and_acc_plus_per_category(tmp_path: Path) -> None:
    release = _mme(tmp_path)
    answers = {"Is there a train in this image? Please answer yes or no.": "Yes",
               "Is there a bed in this image? Please answer yes or no.": "No, there is not.",
               "Is there a bottle in this image? Please answer yes or no.": "yes",
               "Is there a scissors in this image? Please answer yes or no.": "Yes",  # wrong: image 2 not acc+
               "Does this artwork exist in the form of painting? Please answer yes or no.": "No",  # wrong
               "Does this artwork exist in the form of glassware? Please answer yes or no.": "No",
               "Is the output 7? Please answer yes or no.": "Yes", "Is the output 8? Please answer yes or no.": "No"}
    result = run(get("mme"), release, answer_by(answers))
    m = result.metrics
    assert m["existence/acc"] == 0.75 and m["existence/acc_plus"] == 0.5 and m["existence/score"] == 125.0
    assert m["artwork/acc"] == 0.5 and m["artwork/acc_plus"] == 0.0 and m["artwork/score"] == 50.0
    assert m["code_reasoning/score"] == 200.0
    assert m["perception_score"] == 175.0 and m["cognition_score"] == 200.0
    assert result.items[0]["id"] == "artwork/10002/1"


def test_mme_one_category_directory(tmp_path: Path) -> None:
    release = _mme(tmp_path)
    artwork = run(get("mme"), release / "artwork", answer_by({}))
    assert [i["id"] for i in artwork.items] == ["artwork/10002/1", "artwork/10002/2"]
    assert "artwork/acc" in artwork.metrics
    assert len(run(get("mme"), release / "existence", answer_by({})).items) == 4  # a flat one
    qa = release / "artwork" / "questions_answers_YN"
    assert one_line_error("mme", qa).startswith(f"{qa}: expected MME_Benchmark_release_version/")


def test_mme_category_without_questions_is_an_error(tmp_path: Path) -> None:
    release = _mme(tmp_path)
    write_image(release / "landmark" / "images" / "0001.jpg")
    (release / "landmark" / "questions_answer_YN").mkdir()  # misnamed: not the release's questions_answers_YN
    (release / "landmark" / "questions_answer_YN" / "0001.txt").write_text("Is this in Paris?\tYes\n")
    assert one_line_error("mme", release).startswith(f"{release / 'landmark'}: no MME questions (expected "
                                                     "questions_answers_YN/*.txt")


def test_mme_bad_data(tmp_path: Path) -> None:
    release = _mme(tmp_path)
    txt = release / "existence" / "000000018150.txt"
    txt.write_text("Is there a bottle?\tYes\nIs there a cat? Maybe\n")
    assert one_line_error("mme", release) == f"{txt}:2: expected 'QUESTION<TAB>Yes' or 'QUESTION<TAB>No'"
    txt.write_text("Is there a bottle?\tYes\n")
    (release / "existence" / "000000018150.jpg").unlink()
    assert one_line_error("mme", release).startswith(f"{txt}:1: no image 000000018150.jpg/.png")


def _ocrbench(root: Path) -> Path:
    entries = [
        {"dataset_name": "IIIT5K", "id": 0, "image_path": "IIIT5K/1002_1.png", "question": "what is written in the "
         "image?", "answers": ["CHINA"], "type": "Regular Text Recognition"},
        {"dataset_name": "HME100k", "id": 1, "image_path": "HME100k/train_1.jpg", "question": "Please write out the "
         "expression of the formula in the image using LaTeX format.", "answers": ["x ^ { 2 } + 1"],
         "type": "Handwritten Mathematical Expression Recognition"},
        {"dataset_name": "docVQA", "id": 2, "image_path": "docVQA/doc.png", "question": "What is the date?",
         "answers": ["May 5, 1976", "5/5/76"], "type": "Doc-oriented VQA"},
    ]
    for entry in entries:
        write_image(root / "OCRBench_Images" / entry["image_path"])
    (root / "OCRBench.json").write_text(json.dumps(entries, indent=2))
    return root


def test_ocrbench_containment_rule(tmp_path: Path) -> None:
    root = _ocrbench(tmp_path)
    answers = {"what is written in the image?": "The word is china",  # lower-cased containment: right
               "Please write out the expression of the formula in the image using LaTeX format.": "x^{2}+1",
               "What is the date?": "It says 1976."}  # wrong
    result = run(get("ocrbench"), root / "OCRBench.json", answer_by(answers))
    assert result.metrics["score"] == 2 and result.metrics["total"] == 3
    assert result.metrics["Text Recognition/score"] == 1 and result.metrics["Doc-oriented VQA/score"] == 0
    assert [i["correct"] for i in result.items] == [True, True, False]


def test_ocrbench_images_in_the_data_folder(tmp_path: Path) -> None:
    root = _ocrbench(tmp_path)  # the repository's layout: OCRBench/OCRBench.json, OCRBench_Images/ at the root
    (root / "OCRBench").mkdir()
    (root / "OCRBench.json").rename(root / "OCRBench" / "OCRBench.json")
    result = run(get("ocrbench"), root, answer_by({}))
    assert result.metrics["total"] == 3
    (root / "OCRBench_Images" / "docVQA" / "doc.png").unlink()
    assert f"image not found: docVQA/doc.png (looked in OCRBench_Images/ and directly in {root / 'OCRBench'} and " \
           f"{root})" in one_line_error("ocrbench", root)


def test_ocrbench_bad_data(tmp_path: Path) -> None:
    root = _ocrbench(tmp_path)
    (root / "OCRBench_Images" / "docVQA" / "doc.png").unlink()
    line = next(k for k, t in enumerate((root / "OCRBench.json").read_text().splitlines(), 1) if '"docVQA"' in t)
    assert one_line_error("ocrbench", root).startswith(f"{root / 'OCRBench.json'}:{line - 1}: [2]: image not found")


def _hallusion(root: Path) -> Path:
    def entry(category, sub, visual, set_id, figure, question_id, truth, with_file=True):
        return {"category": category, "subcategory": sub, "visual_input": visual, "set_id": set_id,
                "figure_id": figure, "sample_note": "x", "question_id": question_id,
                "question": f"{category}-{sub}-{set_id}-{figure}-{question_id}?", "gt_answer_details": "",
                "gt_answer": truth,
                "filename": f"./hallusion_bench/{category}/{sub}/{set_id}_{figure}.png" if with_file else None}

    entries = [entry("VD", "illusion", "1", "0", "0", "0", "1"), entry("VD", "illusion", "1", "0", "0", "1", "0"),
               entry("VD", "illusion", "1", "0", "1", "0", "0"), entry("VD", "illusion", "1", "0", "1", "1", "1"),
               entry("VS", "chart", "0", "0", "0", "0", "1", with_file=False),
               entry("VS", "chart", "1", "0", "1", "0", "0")]
    for e in entries:
        if e["filename"]:
            write_image(root / e["filename"])
    (root / "HallusionBench.json").write_text(json.dumps(entries, indent=1))
    return root


def test_hallusionbench_question_figure_and_pair_accuracy(tmp_path: Path) -> None:
    root = _hallusion(tmp_path)
    answers = {"VD-illusion-0-0-0?": "Yes", "VD-illusion-0-0-1?": "No",  # figure 0: both right
               "VD-illusion-0-1-0?": "Yes", "VD-illusion-0-1-1?": "Yes",  # figure 1: one wrong
               "VS-chart-0-0-0?": "Yes", "VS-chart-0-1-0?": "No"}  # both right
    result = run(get("hallusionbench"), root, lambda q: answers[q.text.removesuffix(" Please answer yes or no.")])
    m = result.metrics
    assert m["aAcc"] == pytest.approx(5 / 6)
    assert m["figures"] == 3 and m["fAcc"] == pytest.approx(2 / 3)  # VD 0_0, VD 0_1, VS 0_1 (VS no-figure left out)
    assert m["question_pairs"] == 3 and m["qAcc"] == pytest.approx(2 / 3)  # VD q0 (wrong on fig 1), VD q1, VS q0
    assert result.items[4]["correct"] and not json.loads((root / "HallusionBench.json").read_text())[4]["filename"]


def test_hallusionbench_bad_data(tmp_path: Path) -> None:
    root = _hallusion(tmp_path)
    entries = json.loads((root / "HallusionBench.json").read_text())
    entries[3]["gt_answer"] = "maybe"
    (root / "HallusionBench.json").write_text(json.dumps(entries, indent=1))
    line = [k for k, t in enumerate((root / "HallusionBench.json").read_text().splitlines(), 1) if t == " {"][3]
    assert one_line_error("hallusionbench", root) == \
        f"{root / 'HallusionBench.json'}:{line}: [3]: gt_answer must be '0' or '1', not 'maybe'"


def _videomme(root: Path, rows: list[dict]) -> Path:
    (root / "videomme").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(root / "videomme" / "test-00000-of-00001.parquet")
    for row in rows:
        write_video(root / "data" / f"{row['videoID']}.mp4")
    return root


VIDEOMME_ROWS = [
    {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
     "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
     "task_type": "Counting Problem", "question": "How many people are in the video?",
     "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "answer": "C"},
    {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
     "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-2",
     "task_type": "Object Recognition", "question": "What is on the table?",
     "options": ["A. A cup.", "B. A book.", "C. A pen.", "D. A lamp."], "answer": "A"},
    {"video_id": "301", "duration": "medium", "domain": "Sports", "sub_category": "Football",
     "url": "https://www.youtube.com/watch?v=abcdefghijk", "videoID": "abcdefghijk", "question_id": "301-1",
     "task_type": "Action Recognition", "question": "What does the player do?",
     "options": ["A. Runs.", "B. Jumps.", "C. Kicks.", "D. Sits."], "answer": "B"},
]


def test_videomme_parquet_accuracy_by_duration(tmp_path: Path) -> None:
    root = _videomme(tmp_path, VIDEOMME_ROWS)
    seen = []

    def model(query: Query) -> Answer:
        seen.append(query)
        question = query.text.split("\n")[1]
        return Answer({"How many people are in the video?": "C. 3.", "What is on the table?": "The answer is B",
                       "What does the player do?": "(B)"}[question])

    result = run(get("videomme"), root, model)
    assert result.metrics["accuracy"] == pytest.approx(2 / 3)
    assert result.metrics["duration/short"] == 0.5 and result.metrics["duration/medium"] == 1.0
    assert seen[0].video == str(root / "data" / "fFjv93ACGo8.mp4")
    assert seen[0].text.startswith("<video>\nHow many people are in the video?\nA. 1.\nB. 2.\nC. 3.\nD. 4.\n")
    # The same rows as a JSON list, and the parquet file given directly.
    (root / "videomme.json").write_text(json.dumps(VIDEOMME_ROWS))
    assert run(get("videomme"), root / "videomme.json", model).metrics["accuracy"] == pytest.approx(2 / 3)
    assert len(run(get("videomme"), root / "videomme" / "test-00000-of-00001.parquet", model).items) == 3


def test_videomme_bad_data(tmp_path: Path) -> None:
    rows = [dict(row) for row in VIDEOMME_ROWS]
    rows[1]["answer"] = "E"
    root = _videomme(tmp_path, rows)
    parquet = root / "videomme" / "test-00000-of-00001.parquet"
    assert one_line_error("videomme", root) == f"{parquet}: row 1: answer must be one of A, B, C, D, not 'E'"
    (root / "data" / "abcdefghijk.mp4").unlink()
    rows[1]["answer"] = "A"
    pd.DataFrame(rows).to_parquet(parquet)
    assert one_line_error("videomme", root).startswith(f"{parquet}: row 2: video abcdefghijk.mp4 not found")


# ---------------------------------------------------------------------------------------------------------------
# C-Eval, MMLU, AGIEval, GSM8K


def _csv(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return path


def test_ceval_val_split(tmp_path: Path) -> None:
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    _csv(tmp_path / "ceval-exam" / "val" / "computer_network_val.csv",
         [header, ["0", "使用位填充方法，以01111110为位首flag，数据为011011111111111111110010，求问传送时要添加几个0____",
                   "1", "2", "3", "4", "C", ""],
          ["1", "下列关于IP地址的说法正确的是____", "甲", "乙", "丙", "丁", "A", ""]])
    _csv(tmp_path / "ceval-exam" / "val" / "logic_val.csv",
         [header, ["0", "“有些天鹅是黑的”，由此可以推出____", "甲", "乙", "丙", "丁", "D", ""]])
    answers = {"computer_network/0": "C", "computer_network/1": "答案是B", "logic/0": "D"}
    result = run(get("ceval"), tmp_path / "ceval-exam", lambda q: answers[_ceval_id(q)])
    assert result.metrics["accuracy"] == pytest.approx(2 / 3)
    assert result.metrics["subject_average"] == pytest.approx((0.5 + 1.0) / 2)
    assert result.items[0]["id"] == "computer_network/0"


def _ceval_id(query: Query) -> str:
    subject = query.text.split("关于")[1].split("考试")[0]
    return f"{subject}/{0 if '位填充' in query.text or '天鹅' in query.text else 1}"


def test_ceval_dev_split_and_chinese_subject_names(tmp_path: Path) -> None:
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    _csv(tmp_path / "ceval-exam" / "dev" / "computer_network_dev.csv",
         [header, ["0", "下列关于IP地址的说法正确的是____", "甲", "乙", "丙", "丁", "A", "解析"]])
    asked = []
    run(get("ceval"), tmp_path / "ceval-exam" / "dev", lambda q: asked.append(q.text) or "A")
    assert asked[0].startswith("以下是中国关于computer_network考试的单项选择题")  # the split suffix is gone
    (tmp_path / "ceval-exam" / "subject_mapping.json").write_text(json.dumps(
        {"computer_network": ["Computer Network", "计算机网络", "STEM"], "logic": ["Logic", "逻辑学", "Humanities"]},
        ensure_ascii=False))
    result = run(get("ceval"), tmp_path / "ceval-exam" / "dev", lambda q: asked.append(q.text) or "A")
    assert asked[1].startswith("以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n下列关于IP地址")
    assert result.items[0]["subject"] == "computer_network" and result.metrics["subject/computer_network"] == 1.0


def test_ceval_bad_data(tmp_path: Path) -> None:
    test_csv = _csv(tmp_path / "test" / "logic_test.csv",
                    [["id", "question", "A", "B", "C", "D"], ["0", "q", "a", "b", "c", "d"]])
    assert one_line_error("ceval", test_csv) == \
        f"{test_csv}:1: missing column(s) answer (the test split has no answers: use val/)"
    bad = _csv(tmp_path / "val" / "logic_val.csv",
               [["id", "question", "A", "B", "C", "D", "answer"], ["0", "q", "a", "b", "c", "d", "A"],
                ["1", "multi\nline question", "a", "b", "c", "d", "A"], ["2", "q", "a", "b", "c", "d", "Z"]])
    assert one_line_error("ceval", tmp_path) == f"{bad}:5: answer must be A, B, C or D, not 'Z'"
    misnamed = _csv(bad, [["id", "question", "A", "B", "C", "D", "Answer"], ["0", "q", "a", "b", "c", "d", "A"]])
    assert one_line_error("ceval", tmp_path) == f"{misnamed}:1: missing column(s) answer"  # no test-split hint


def test_mmlu_headerless_csvs(tmp_path: Path) -> None:
    _csv(tmp_path / "data" / "test" / "abstract_algebra_test.csv",
         [["Find the degree for the given field extension Q(sqrt(2)) over Q.", "0", "2", "4", "6", "B"],
          ["Let p = (1, 2, 5, 4)(2, 3) in S_5 . Find the index of <p> in S_5.", "8", "2", "24", "120", "C"]])
    _csv(tmp_path / "data" / "test" / "anatomy_test.csv",
         [["What is the embryological origin of the hyoid bone?", "The first pharyngeal arch",
           "The first and second pharyngeal arches", "The second pharyngeal arch",
           "The second and third pharyngeal arches", "D"]])
    answers = {"Find the degree for the given field extension Q(sqrt(2)) over Q.": "B",
               "Let p = (1, 2, 5, 4)(2, 3) in S_5 . Find the index of <p> in S_5.": "B. 2",
               "What is the embryological origin of the hyoid bone?": "D"}
    asked: list[str] = []

    def model(query: Query) -> str:
        asked.append(query.text)
        return answers[query.text.split("\n\n")[1].split("\n")[0]]

    result = run(get("mmlu"), tmp_path / "data", model)
    assert result.metrics["accuracy"] == pytest.approx(2 / 3)
    assert result.metrics["subject/abstract_algebra"] == 0.5 and result.metrics["subject/anatomy"] == 1.0
    assert result.metrics["subject_average"] == pytest.approx(0.75)
    assert result.items[0]["subject"] == "abstract_algebra"
    assert asked[0] == ("The following is a multiple choice question about abstract algebra.\n\n"
                        "Find the degree for the given field extension Q(sqrt(2)) over Q.\nA. 0\nB. 2\nC. 4\nD. 6\n"
                        "Answer:")


def test_mmlu_val_split_subject(tmp_path: Path) -> None:
    _csv(tmp_path / "data" / "val" / "abstract_algebra_val.csv",
         [["Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.", "0", "1", "2", "3", "B"]])
    asked = []
    result = run(get("mmlu"), tmp_path / "data" / "val", lambda q: asked.append(q.text) or "B")
    assert result.metrics["subject/abstract_algebra"] == 1.0 and result.items[0]["id"] == "abstract_algebra/1"
    assert asked[0].startswith("The following is a multiple choice question about abstract algebra.\n\n")


def test_mmlu_bad_data(tmp_path: Path) -> None:
    bad = _csv(tmp_path / "test" / "anatomy_test.csv", [["q", "a", "b", "c", "d", "A"], ["q", "a", "b", "A"]])
    assert one_line_error("mmlu", tmp_path) == \
        f"{bad}:2: 4 columns; MMLU rows have 6 (question, A, B, C, D, answer)"
    bad.write_bytes(b"q,a,b,c,d,A\nq\xff,a,b,c,d,A\n")
    assert one_line_error("mmlu", tmp_path) == f"{bad}:2: not UTF-8 text"


def _jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def test_agieval_choice_multi_answer_and_cloze(tmp_path: Path) -> None:
    _jsonl(tmp_path / "data" / "v1" / "lsat-ar.jsonl", [
        {"passage": "Seven books are ...", "question": "Which one could be true?",
         "options": ["(A)x", "(B)y", "(C)z", "(D)w", "(E)v"], "label": "E", "answer": None}])
    _jsonl(tmp_path / "data" / "v1" / "gaokao-physics.jsonl", [
        {"passage": None, "question": "下列说法正确的是", "options": ["(A)甲", "(B)乙", "(C)丙", "(D)丁"],
         "label": ["A", "C"], "answer": None}])
    _jsonl(tmp_path / "data" / "v1" / "math.jsonl", [
        {"passage": None, "question": "What is $1+1$?", "options": None, "label": None, "answer": "2"},
        {"passage": None, "question": "Half of one?", "options": None, "label": None, "answer": "\\frac{1}{2}"}])
    answers = {"Seven books are ...": "E", "下列说法正确的是": "A, C", "What is $1+1$?": "3",
               "Half of one?": "The answer is $\\boxed{0.5}$."}
    result = run(get("agieval"), tmp_path / "data" / "v1", lambda q: answers[q.text.split("\n")[0]])
    assert [i["correct"] for i in result.items] == [True, True, False, True]  # by file: gaokao, lsat, math
    assert result.metrics["accuracy"] == pytest.approx(3 / 4) and result.metrics["task/math"] == 0.5


def test_agieval_repository_data_folder_holds_two_versions(tmp_path: Path) -> None:
    row = {"passage": None, "question": "q", "options": ["(A)1", "(B)2"], "label": "A", "answer": None}
    for version in ("v1", "v1_1"):
        _jsonl(tmp_path / "data" / version / "sat-math.jsonl", [row])
    data = tmp_path / "data"
    assert one_line_error("agieval", data) == (f"{data}: .jsonl files in 2 folders (v1, v1_1), each a version of "
                                               f"the questions: pass one, e.g. --data {data / 'v1_1'}")
    assert len(run(get("agieval"), data / "v1_1", answer_by({})).items) == 1


def test_agieval_multi_answer_letters_written_together(tmp_path: Path) -> None:
    _jsonl(tmp_path / "gaokao-physics.jsonl", [
        {"passage": None, "question": f"下列说法正确的是{k}", "options": ["(A)甲", "(B)乙", "(C)丙", "(D)丁"],
         "label": ["A", "C"], "answer": None} for k in range(4)])
    answers = ["AC", "答案是AC", "(A)(C)", "A"]
    result = run(get("agieval"), tmp_path, lambda q: answers[int(q.text.split("\n")[0][-1])])
    assert [i["correct"] for i in result.items] == [True, True, True, False]


def test_agieval_bad_data(tmp_path: Path) -> None:
    bad = _jsonl(tmp_path / "sat-math.jsonl", [
        {"passage": None, "question": "q", "options": ["(A)1", "(B)2"], "label": "A"}, "{oops"])
    assert one_line_error("agieval", tmp_path) == f"{bad}:2: bad JSON: Expecting property name enclosed in double " \
                                                   "quotes (column 2)"
    _jsonl(bad, [{"passage": None, "question": "q", "options": ["(A)1", "(B)2"], "label": "C"}])
    assert one_line_error("agieval", bad) == f"{bad}:1: label 'C' is not among the 2 options"


def test_gsm8k(tmp_path: Path) -> None:
    test = _jsonl(tmp_path / "grade_school_math" / "data" / "test.jsonl", [
        {"question": "Janet has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "A box holds 1,000 pens. How many in 2 boxes?", "answer": "2 * 1000 = 2000\n#### 2,000"}])
    answers = {"Janet has 3 apples and buys 4 more. How many?": "She has 3 + 4 = 7 apples.\n#### 7",
               "A box holds 1,000 pens. How many in 2 boxes?": "That makes 2000 pens... or 3000"}
    result = run(get("gsm8k"), tmp_path / "grade_school_math", lambda q: answers[q.text.split("\n")[0]])
    assert [i["reference"] for i in result.items] == ["7", "2000"]
    assert result.metrics["accuracy"] == 0.5
    _jsonl(test, [{"question": "q", "answer": "no final line"}])
    assert one_line_error("gsm8k", test) == f"{test}:1: the answer does not end with '#### <number>'"


def test_missing_data_path_and_bad_limit(tmp_path: Path) -> None:
    assert one_line_error("mmlu", tmp_path / "nowhere").startswith(f"{tmp_path / 'nowhere'}: no such file")
    with pytest.raises(DataError, match="--limit must be at least 1"):
        run(get("gsm8k"), tmp_path, answer_by({}), limit=0)
