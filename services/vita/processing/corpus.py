"""A built-in English + Chinese corpus, so the tiny model's tokenizer is trained without any download.

Sentences come from question/answer templates over small word lists (colours, shapes, counting, weather,
places, actions), each with a Chinese counterpart, echoing VITA's bilingual instruction data.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import astuple
from pathlib import Path

from vita.processing.prompt import SYSTEM_PROMPTS
from vita.processing.tokenizer import VitaTokenizer, train_tokenizer

COLOURS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("black", "黑色"),
           ("white", "白色"), ("purple", "紫色"), ("orange", "橙色"), ("pink", "粉色"), ("grey", "灰色"),
           ("brown", "棕色"), ("gold", "金色")]
SHAPES = [("circle", "圆形"), ("square", "正方形"), ("triangle", "三角形"), ("star", "星形"),
          ("rectangle", "长方形"), ("heart", "心形"), ("diamond", "菱形"), ("oval", "椭圆形")]
# (English, Chinese, Chinese measure word)
THINGS = [("apple", "苹果", "个"), ("book", "书", "本"), ("cup", "杯子", "个"), ("chair", "椅子", "把"),
          ("car", "汽车", "辆"), ("ball", "球", "个"), ("bird", "鸟", "只"), ("cat", "猫", "只"),
          ("dog", "狗", "只"), ("tree", "树", "棵"), ("flower", "花", "朵"), ("pen", "笔", "支"),
          ("bottle", "瓶子", "个"), ("phone", "手机", "部"), ("boat", "船", "条"), ("house", "房子", "座")]
NUMBERS = [("two", "两"), ("three", "三"), ("four", "四"), ("five", "五"), ("six", "六"), ("seven", "七"),
           ("eight", "八"), ("nine", "九"), ("ten", "十"), ("eleven", "十一"), ("twelve", "十二")]
WEATHER = [("sunny", "是晴天"), ("raining", "在下雨"), ("cloudy", "多云"), ("snowing", "在下雪"),
           ("windy", "刮大风"), ("hot", "很热"), ("cold", "很冷"), ("foggy", "有雾")]
CITIES = [("Beijing", "北京"), ("Shanghai", "上海"), ("Shenzhen", "深圳"), ("Hangzhou", "杭州"),
          ("Chengdu", "成都"), ("London", "伦敦"), ("Paris", "巴黎"), ("Tokyo", "东京"), ("New York", "纽约")]
TIMES = [("today", "今天"), ("this morning", "今天早上"), ("this afternoon", "今天下午"), ("tonight", "今天晚上")]
PLACES = [("above", "上面"), ("below", "下面"), ("to the left of", "左边"), ("to the right of", "右边"),
          ("next to", "旁边"), ("inside", "里面")]
ANIMALS = [("cat", "猫"), ("dog", "狗"), ("bird", "小鸟"), ("horse", "马"), ("panda", "熊猫"), ("rabbit", "兔子"),
           ("fish", "鱼"), ("monkey", "猴子")]
ACTIONS = [("running", "跑步"), ("eating", "吃东西"), ("sleeping", "睡觉"), ("jumping", "跳"),
           ("swimming", "游泳"), ("playing with a ball", "玩球"), ("climbing a tree", "爬树"), ("drinking water", "喝水")]
CHAT = [("Hello, my name is VITA. How can I help you?", "你好，我是VITA。有什么可以帮你的吗？"),
        ("Please describe the picture in detail.", "请详细描述这张图片。"),
        ("What happens in this video?", "这个视频里发生了什么？"),
        ("Can you say that again, please?", "请你再说一遍好吗？"),
        ("Thank you, that is very helpful.", "谢谢，这很有帮助。"),
        ("Sorry, I made a mistake. The correct answer is below.", "对不起，我说错了。正确的答案如下。"),
        ("I cannot see an image, so I will answer from my own knowledge.", "我看不到图片，所以我根据自己的知识回答。")]

Pair = tuple[str, str]


def _colour_question(r: random.Random) -> Pair:
    (shape, shape_zh), (colour, colour_zh) = r.choice(SHAPES), r.choice(COLOURS)
    if r.random() < 0.5:
        return f"What colour is the {shape}?", f"这个{shape_zh}是什么颜色的？"
    return f"The {shape} is {colour}.", f"这个{shape_zh}是{colour_zh}的。"


def _counting(r: random.Random) -> Pair:
    (thing, thing_zh, measure), (number, number_zh) = r.choice(THINGS), r.choice(NUMBERS)
    roll = r.random()
    if roll < 0.35:
        return f"How many {thing}s are there in the picture?", f"图片里有几{measure}{thing_zh}？"
    if roll < 0.7:
        return f"There are {number} {thing}s.", f"有{number_zh}{measure}{thing_zh}。"
    n = r.randint(2, 99)
    return f"I can see {n} {thing}s on the table.", f"我能看到桌子上有{n}{measure}{thing_zh}。"


def _weather(r: random.Random) -> Pair:
    (city, city_zh), (time, time_zh), (weather, weather_zh) = r.choice(CITIES), r.choice(TIMES), r.choice(WEATHER)
    if r.random() < 0.5:
        return f"What is the weather like in {city} {time}?", f"{time_zh}{city_zh}的天气怎么样？"
    return f"It is {weather} in {city} {time}.", f"{time_zh}{city_zh}{weather_zh}。"


def _position(r: random.Random) -> Pair:
    (c1, c1_zh), (c2, c2_zh) = r.sample(COLOURS, 2)
    (s1, s1_zh), (s2, s2_zh) = r.sample(SHAPES, 2)
    place, place_zh = r.choice(PLACES)
    if r.random() < 0.5:
        return (f"Is the {c1} {s1} {place} the {c2} {s2}?", f"{c1_zh}的{s1_zh}在{c2_zh}的{s2_zh}{place_zh}吗？")
    return (f"Yes, the {c1} {s1} is {place} the {c2} {s2}.", f"是的，{c1_zh}的{s1_zh}在{c2_zh}的{s2_zh}{place_zh}。")


def _arithmetic(r: random.Random) -> Pair:
    a, b = r.randint(1, 50), r.randint(1, 50)
    if r.random() < 0.5:
        return f"What is {a} plus {b}?", f"{a}加{b}等于多少？"
    return f"{a} plus {b} is {a + b}.", f"{a}加{b}等于{a + b}。"


def _video(r: random.Random) -> Pair:
    (animal, animal_zh), (action, action_zh) = r.choice(ANIMALS), r.choice(ACTIONS)
    if r.random() < 0.5:
        return f"What is the {animal} doing in the video?", f"视频里的{animal_zh}在做什么？"
    return f"The {animal} is {action}.", f"{animal_zh}正在{action_zh}。"


def _chat(r: random.Random) -> Pair:
    return r.choice(CHAT)


TEMPLATES: list[Callable[[random.Random], Pair]] = [
    _colour_question, _counting, _weather, _position, _arithmetic, _video, _chat,
]


def bilingual_corpus(n_sentences: int = 3000, seed: int = 0) -> list[str]:
    """English, Chinese and mixed lines in equal measure; the same `seed` always gives the same list."""
    r = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        english, chinese = r.choice(TEMPLATES)(r)
        lines.append(r.choice((english, chinese, f"{english} {chinese}")))
    return lines


def build_tiny_tokenizer(output_dir: str | Path, vocab_size: int = 2048) -> VitaTokenizer:
    """Trains on the corpus plus the system prompts and role names, which open every prompt."""
    lines = bilingual_corpus() + list(astuple(SYSTEM_PROMPTS)) + ["system:", "user:", "bot:"]
    return VitaTokenizer.from_file(train_tokenizer(lines, Path(output_dir) / "tokenizer.model", vocab_size))
