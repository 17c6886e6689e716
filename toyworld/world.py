"""The synthetic long-tail world: invented entities with fixed looks, rendered into captioned scenes.

Why it exists: Re-Imagen's claims are about long-tail entities whose look a text-to-image model
cannot know from their name alone, and which retrieval supplies (Sec. 1, Sec. 4.2). This world reproduces that
situation at a size a CPU can train on:

* **Entities** have invented, pronounceable names ("Korvani", "Mezulo") and a fixed visual identity drawn
  independently of the name: a silhouette (``SHAPES``), a body colour, a pattern (``PATTERNS``) and a pattern
  colour. Nothing in a name predicts its look, so the only way to draw an entity the model has not memorised is
  to copy it from retrieved neighbours.
* **Scenes** place one or two copies of an entity on a background (grass, moon, beach, snow, night), on the
  left or the right. Captions name the entity and the scene, never the look.
* **The corpus** follows a long tail: entity ``i`` of the seen ones appears ``~ C / (i + q)^s`` times
  (Zipf-Mandelbrot); a held-out set of entities never appears in it but has reference pairs in the knowledge
  base, like the unseen entities of EntityDrawBench. The frequency splits are counted from the corpus
  (``frequency_splits``), as the paper counts them from its training captions.

Everything is a pure function of ``WorldSpec`` (and a seed per image), so the same seed gives the same world
byte for byte. Rendering is supersampled 4x and box-filtered to 64x64 so edges look like photographs of flat
objects rather than aliased masks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Iterable, Sequence

import numpy as np

IMAGE_SIZE = 64
SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "diamond", "cross")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (240, 215, 30), "blue": (35, 80, 225),
    "purple": (135, 45, 195), "pink": (245, 120, 195), "cyan": (30, 205, 215), "white": (250, 250, 250),
    "black": (22, 22, 22),
}
BODY_COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "blue", "purple", "pink", "cyan")
PATTERN_COLOURS: tuple[str, ...] = tuple(PALETTE)  # any palette colour other than the body's
PATTERNS: tuple[str, ...] = ("plain", "striped", "spotted", "two-tone")
BACKGROUNDS: tuple[str, ...] = ("grass", "moon", "beach", "snow", "night")
POSITIONS: tuple[str, ...] = ("left", "right")
COUNTS: tuple[int, ...] = (1, 2)
#: How a caption says each background (the judge reads the background back, not the wording).
BACKGROUND_PHRASES: dict[str, str] = {"grass": "on the grass", "moon": "on the moon", "beach": "on the beach",
                                      "snow": "in the snow", "night": "at night"}
#: Attributes of an entity's look, and of a scene. Faithfulness needs all of both (Sec. 4.2).
LOOK_ATTRIBUTES: tuple[str, ...] = ("shape", "body", "pattern", "pattern_colour")
SCENE_ATTRIBUTES: tuple[str, ...] = ("background", "count", "position")
ATTRIBUTE_CLASSES: dict[str, tuple] = {
    "shape": SHAPES, "body": BODY_COLOURS, "pattern": PATTERNS, "pattern_colour": PATTERN_COLOURS,
    "background": BACKGROUNDS, "count": COUNTS, "position": POSITIONS,
}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh", "tr", "br", "kl", "gr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "x")


@dataclass(frozen=True)
class Look:
    """An entity's fixed visual identity."""

    shape: str
    body: str
    pattern: str
    pattern_colour: str  # "" for plain entities

    def key(self) -> tuple[str, str, str, str]:
        return (self.shape, self.body, self.pattern, self.pattern_colour)


@dataclass(frozen=True)
class Entity:
    id: str  # "e000" ... stable, file-name safe
    name: str  # invented, capitalised ("Korvani")
    look: Look
    seen: bool  # appears in the training corpus


@dataclass(frozen=True)
class Scene:
    """What a caption says: which entity, how many, where, on what."""

    entity: str  # entity id
    count: int
    position: str
    background: str


@dataclass(frozen=True)
class BenchPrompt:
    id: str  # "<split>-<entity id>": the prompt id (images are a function of it, the sample index and the seed)
    entity: str
    split: str  # frequent | infrequent | unseen
    scene: Scene
    text: str


#: The object scale of world v3 (``toy build --object-scale 1.4``; not the shipped cascade's, toyworld/README.md).
V3_OBJECT_SCALE = 1.4


@dataclass(frozen=True)
class WorldSpec:
    seed: int = 0
    # Many entities with few images each (median 11), so that names cannot be cheaply memorised and copying
    # from the neighbours pays on most training rows; the head (36 entities >= 100 images) holds 36% of the
    # corpus. The first world (300 entities, s = 1.3, q = 3) put 73% of the rows on 37 entities and trained
    # a cascade that ignored its neighbours' content (README, "The synthetic long-tail world").
    n_entities: int = 850  # at most len(all_looks()) = 875: every entity has its own look
    n_unseen: int = 80  # entities that never appear in the corpus but have reference pairs
    corpus_size: int = 20_000
    zipf_s: float = 1.0  # Zipf-Mandelbrot exponent of the seen entities' frequencies
    zipf_q: float = 10.0  # ... and its offset (flattens the head)
    n_references: int = 3  # reference pairs per entity in the knowledge base
    validation_size: int = 2_000  # held-out scenes for FID
    # Size of the objects relative to the first worlds' (copies 15-25 px across at 64 px). World v3 draws them
    # 1.4x larger, so that what tells shapes and patterns apart is 1.5-6 px at the base stage's 32 px rather than
    # 1-4 (toyworld/README.md); 1.0 gives the earlier worlds byte for byte.
    object_scale: float = 1.0


def _rng(*key: object) -> np.random.Generator:
    """A generator seeded by sha256 of ``key``: independent streams per (seed, purpose, index)."""
    h = hashlib.sha256(json.dumps([str(k) for k in key]).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def invent_names(n: int, seed: int) -> list[str]:
    """``n`` distinct pronounceable names of two or three syllables."""
    rng = _rng(seed, "names")
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        syl = int(rng.integers(2, 4))
        name = "".join(str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) for _ in range(syl)) + str(rng.choice(_CODAS))
        if name in seen or len(name) > 10:
            continue
        seen.add(name)
        out.append(name.capitalize())
    return out


def all_looks() -> list[Look]:
    looks = []
    for shape in SHAPES:
        for body in BODY_COLOURS:
            looks.append(Look(shape, body, "plain", ""))
            for pattern in PATTERNS[1:]:
                for pc in PATTERN_COLOURS:
                    if pc != body:
                        looks.append(Look(shape, body, pattern, pc))
    return looks


class World:
    """The world of one ``WorldSpec``: entities, corpus scenes, references, validation scenes, prompts."""

    def __init__(self, spec: WorldSpec = WorldSpec()):
        if spec.n_unseen >= spec.n_entities:
            raise ValueError("n_unseen must be smaller than n_entities")
        self.spec = spec
        rng = _rng(spec.seed, "entities")
        names = invent_names(spec.n_entities, spec.seed)
        looks = all_looks()
        if spec.n_entities > len(looks):
            raise ValueError(f"at most {len(looks)} entities have distinct looks")
        # Looks are drawn without replacement, independently of the names: a name says nothing about its look.
        pick = rng.permutation(len(looks))[: spec.n_entities]
        unseen = set(rng.permutation(spec.n_entities)[: spec.n_unseen].tolist())
        self.entities: list[Entity] = [Entity(f"e{i:03d}", names[i], looks[int(pick[i])], i not in unseen)
                                       for i in range(spec.n_entities)]
        self.by_id = {e.id: e for e in self.entities}
        self.by_name = {e.name.lower(): e for e in self.entities}

    # -- frequencies -------------------------------------------------------------------------------
    @cached_property
    def corpus_counts(self) -> dict[str, int]:
        """Images of each entity in the corpus: a Zipf-Mandelbrot long tail over the seen entities (in a
        random order, so frequency is unrelated to the entity's id or look); 0 for unseen entities."""
        s = self.spec
        seen = [e.id for e in self.entities if e.seen]
        order = _rng(s.seed, "frequency-order").permutation(len(seen))
        w = 1.0 / (np.arange(len(seen)) + 1 + s.zipf_q) ** s.zipf_s
        counts = np.maximum(1, np.floor(w / w.sum() * s.corpus_size)).astype(int)
        counts[0] += s.corpus_size - counts.sum()  # exact total; the head absorbs the rounding
        out = {e.id: 0 for e in self.entities}
        for rank, j in enumerate(order):
            out[seen[int(j)]] = int(counts[rank])
        return out

    # -- scenes ------------------------------------------------------------------------------------
    @staticmethod
    def random_scene(entity_id: str, rng: np.random.Generator) -> Scene:
        return Scene(entity_id, int(rng.choice(COUNTS)), str(rng.choice(POSITIONS)), str(rng.choice(BACKGROUNDS)))

    @cached_property
    def corpus(self) -> list[Scene]:
        """The training corpus: ``corpus_counts[e]`` scenes of every seen entity, shuffled."""
        rng = _rng(self.spec.seed, "corpus")
        scenes = [self.random_scene(eid, rng) for eid, c in self.corpus_counts.items() for _ in range(c)]
        return [scenes[int(i)] for i in rng.permutation(len(scenes))]

    @cached_property
    def references(self) -> list[Scene]:
        """``n_references`` reference scenes per entity (seen or not): one entity, any background."""
        rng = _rng(self.spec.seed, "references")
        return [Scene(e.id, 1, str(rng.choice(POSITIONS)), str(rng.choice(BACKGROUNDS)))
                for e in self.entities for _ in range(self.spec.n_references)]

    @cached_property
    def reference_rows(self) -> dict[str, list[int]]:
        """Entity id -> indices of its scenes in ``references`` (in order)."""
        rows: dict[str, list[int]] = {}
        for i, s in enumerate(self.references):
            rows.setdefault(s.entity, []).append(i)
        return rows

    @cached_property
    def validation(self) -> list[Scene]:
        """Held-out scenes with the corpus's entity distribution (the FID reference set)."""
        rng = _rng(self.spec.seed, "validation")
        ids = list(self.corpus_counts)
        p = np.array([self.corpus_counts[i] for i in ids], dtype=float)
        return [self.random_scene(ids[int(j)], rng) for j in rng.choice(len(ids), self.spec.validation_size, p=p / p.sum())]

    def frequency_splits(self, frequent_min: int = 100, infrequent_max: int = 10) -> dict[str, list[str]]:
        """Entity ids by corpus frequency: ``frequent`` (>= frequent_min images), ``infrequent``
        (1 .. infrequent_max), ``unseen`` (0). Entities in between belong to no split."""
        c = self.corpus_counts
        return {"frequent": [e for e, n in c.items() if n >= frequent_min],
                "infrequent": [e for e, n in c.items() if 1 <= n <= infrequent_max],
                "unseen": [e for e, n in c.items() if n == 0]}

    def bench_prompts(self, per_split: int | None = None, seed: int = 0, frequent_min: int = 100,
                      infrequent_max: int = 10) -> list["BenchPrompt"]:
        """The EntityDrawBench-style prompt set (Sec. 4.2): one prompt per entity of each frequency split, a full
        scene caption (count, background, position) for a scene drawn with ``seed``. ``per_split`` keeps the first
        N entities of each split (None: all)."""
        rng = _rng(self.spec.seed, "bench", seed)
        out = []
        for split, ids in self.frequency_splits(frequent_min, infrequent_max).items():
            for eid in ids[:per_split] if per_split is not None else ids:
                scene = self.random_scene(eid, rng)
                out.append(BenchPrompt(f"{split}-{eid}", eid, split, scene, self.caption(scene, 0)))
        return out

    # -- text --------------------------------------------------------------------------------------
    def caption(self, scene: Scene, variant: int = 0, mention: tuple[bool, bool] = (True, True)) -> str:
        """The caption of a scene. Names the entity and its count; mentions the background and the position
        when ``mention`` says so; never describes the entity's look."""
        name = self.by_id[scene.entity].name
        subject = f"a {name}" if scene.count == 1 else f"two {name}s"
        bg, pos = mention
        where = f" {BACKGROUND_PHRASES[scene.background]}" if bg else ""
        if not pos:
            return (f"{subject}{where}.", f"a photo of {subject}{where}.")[variant % 2]
        templates = (f"{subject}{where}, on the {scene.position}.",
                     f"a photo of {subject}{where}, on the {scene.position}.",
                     f"{subject} on the {scene.position} side{',' if where else ''}{where}.")
        return templates[variant % len(templates)]

    @cached_property
    def corpus_captions(self) -> list[str]:
        """Captions of the corpus. Like web alt-texts they are partial: the background is mentioned with
        probability 0.75 and the position with 0.6 (the count always), so retrieved neighbours of a caption
        share its entity but not always its scene; the model has to take the look from the neighbours and the
        scene from the text."""
        rng = _rng(self.spec.seed, "captions")
        flags = rng.random((len(self.corpus), 2)) < np.array([0.75, 0.6])
        return [self.caption(s, i, (bool(f[0]), bool(f[1]))) for i, (s, f) in enumerate(zip(self.corpus, flags))]

    def reference_caption(self, entity_id: str) -> str:
        """The text of an entity's reference pair (EntityDrawBench's reference text)."""
        return f"a photo of a {self.by_id[entity_id].name}."

    # -- images ------------------------------------------------------------------------------------
    def render(self, scene: Scene, key: Sequence[object]) -> np.ndarray:
        """A 64x64 HWC uint8 image of ``scene``; ``key`` seeds the jitter (layout, background details)."""
        return render_scene(self.by_id[scene.entity].look, scene, _rng(self.spec.seed, "render", *key),
                            self.spec.object_scale)

    def fingerprint(self) -> str:
        spec = asdict(self.spec)
        if spec["object_scale"] == 1.0:  # (added with world v3: the earlier worlds keep their fingerprints)
            del spec["object_scale"]
        h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
        h.update(json.dumps([(e.id, e.name, e.look.key(), e.seen) for e in self.entities]).encode())
        h.update(json.dumps(sorted(self.corpus_counts.items())).encode())
        h.update(json.dumps(self.corpus_captions).encode())
        return h.hexdigest()[:16]



def rebuild_world(spec: dict, fingerprint: str | None, what: str, fix: str) -> World:
    """The World of a recorded ``WorldSpec`` (a world folder's world.json, a run's run.json), checked against the
    fingerprint recorded with it: the same spec gives another world once the world code changes."""
    world = World(WorldSpec(**spec))
    if world.fingerprint() != fingerprint:
        raise ValueError(f"{what} was made on world {fingerprint}, but its spec now gives {world.fingerprint()} "
                         f"(the world code changed): {fix}")
    return world

# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    return yy / SUPERSAMPLE, xx / SUPERSAMPLE  # in 64px units


_YY, _XX = _grid(IMAGE_SIZE * SUPERSAMPLE)


def _window(cy: float, cx: float, rad: float) -> tuple[slice, slice]:
    """The supersampled rows and columns within ``rad`` (64px units, plus a pixel) of (cy, cx). Element-wise
    operations on this window give the same values as on the whole image: drawing a small thing in its window
    is the same bytes as masking all 256 x 256 pixels for it (the world renders 1.6x faster)."""
    n, s = IMAGE_SIZE * SUPERSAMPLE, SUPERSAMPLE
    return (slice(max(0, int((cy - rad) * s) - 1), min(n, int((cy + rad) * s) + 2)),
            slice(max(0, int((cx - rad) * s) - 1), min(n, int((cx + rad) * s) + 2)))


def _background(name: str, rng: np.random.Generator) -> np.ndarray:
    """Float HWC image of a background, with jittered horizon and details."""
    n = IMAGE_SIZE * SUPERSAMPLE
    img = np.empty((n, n, 3), dtype=np.float32)
    yy, xx = _YY, _XX
    horizon = rng.uniform(14, 22)
    shade = rng.uniform(0.9, 1.1)

    def fill(mask, colour, win=(slice(None), slice(None))):
        # copyto(where=) assigns the same values as img[mask] = ..., without gathering the masked pixels
        np.copyto(img[win], np.clip(np.array(colour, dtype=np.float32) * shade, 0, 255), where=mask[..., None])

    def dot(cy, cx, rad, inside, colour, within=None):
        """A small thing (star, crater, snowflake) drawn in its window: ``inside(y, x)`` on the window's grid,
        and only where the whole-image mask ``within`` is set."""
        w = _window(cy, cx, rad)
        m = inside(yy[w], xx[w])
        if within is not None:
            m &= within[w]
        fill(m, colour, w)

    sky = yy < horizon
    if name == "grass":
        fill(sky, (150, 200, 245))
        fill(~sky, (70, 150, 55))
        blades = (np.sin(xx * rng.uniform(2.5, 3.5) + rng.uniform(0, 6)) > 0.6) & (yy > horizon + 4) & ((yy * 7).astype(int) % 5 == 0)
        fill(blades, (50, 120, 40))
    elif name == "moon":
        ground = ~sky
        fill(sky, (8, 8, 14))
        fill(ground, (140, 140, 145))
        for _ in range(int(rng.integers(3, 6))):
            cy, cx, r = rng.uniform(horizon + 4, 62), rng.uniform(2, 62), rng.uniform(2, 5)
            dot(cy, cx, r, lambda y, x: (y - cy) ** 2 / 0.4 + (x - cx) ** 2 <= r * r, (105, 105, 110), ground)
        for _ in range(int(rng.integers(4, 9))):
            sy, sx = rng.uniform(1, horizon - 1), rng.uniform(1, 63)
            dot(sy, sx, 0.5, lambda y, x: (np.abs(y - sy) < 0.5) & (np.abs(x - sx) < 0.5), (230, 230, 230))
    elif name == "beach":
        sea = yy < horizon + rng.uniform(6, 10)
        fill(sky, (160, 210, 250))
        fill(sea & ~sky, (40, 120, 185))
        fill(~sea, (225, 200, 140))
    elif name == "snow":
        fill(sky, (200, 210, 225))
        fill(~sky, (242, 245, 250))
        for _ in range(int(rng.integers(8, 16))):
            sy, sx = rng.uniform(1, 63), rng.uniform(1, 63)
            dot(sy, sx, 1.0, lambda y, x: (y - sy) ** 2 + (x - sx) ** 2 < 0.5, (255, 255, 255))
        drift = (yy > horizon + 6 + 3 * np.sin(xx / 9 + rng.uniform(0, 6)))
        np.multiply(img, 0.96, out=img, where=drift[..., None])
    elif name == "night":
        fill(sky, (12, 18, 55))
        fill(~sky, (25, 35, 40))
        for _ in range(int(rng.integers(8, 14))):
            sy, sx = rng.uniform(1, horizon - 1), rng.uniform(1, 63)
            dot(sy, sx, 0.5, lambda y, x: (np.abs(y - sy) < 0.5) & (np.abs(x - sx) < 0.5), (250, 240, 180))
        my, mx = rng.uniform(4, max(5, horizon - 5)), rng.uniform(6, 58)
        dot(my, mx, 3.0, lambda y, x: (y - my) ** 2 + (x - mx) ** 2 < 9, (245, 240, 200), sky)
    else:
        raise ValueError(f"unknown background {name!r}; choose one of {BACKGROUNDS}")
    return img


def _silhouette(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    ady, adx = np.abs(dy), np.abs(dx)
    if shape == "disc":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return (ady <= r * 0.82) & (adx <= r * 0.82)
    if shape == "triangle":  # apex up
        return (dy <= r * 0.75) & (dy >= -r) & (adx <= (dy + r) * 0.62)
    if shape == "diamond":
        return ady + adx <= r * 1.1
    if shape == "cross":
        return ((ady <= r * 0.34) | (adx <= r * 0.34)) & (ady <= r) & (adx <= r)
    raise ValueError(f"unknown shape {shape!r}")


def _pattern(pattern: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    if pattern == "plain":
        return np.zeros(dy.shape, dtype=bool)
    if pattern == "striped":  # horizontal bands, period 0.8 r
        return np.floor(dy / (0.4 * r)).astype(int) % 2 == 0
    if pattern == "spotted":  # a grid of dots
        p = 0.85 * r
        gy, gx = (dy / p) - np.round(dy / p), (dx / p) - np.round(dx / p)
        return gy * gy + gx * gx <= 0.3 ** 2
    if pattern == "two-tone":  # left half in the pattern colour
        return dx < 0
    raise ValueError(f"unknown pattern {pattern!r}")


def _layout(scene: Scene, rng: np.random.Generator, scale: float = 1.0) -> list[tuple[float, float, float]]:
    """(cy, cx, r) of each copy, in 64px units: left copies have cx < 26, right ones cx > 38 (at ``scale`` 1; larger
    copies are moved in so that their outer edge stays in the image, and two copies further apart)."""
    side = -1 if scene.position == "left" else 1
    offset = rng.uniform(11, 16)
    if scene.count == 1:
        cy, r = rng.uniform(30, 42), rng.uniform(10, 12.5) * scale
        return [(cy, 32 + side * min(offset, max(11.0, 30 - r)), r)]
    r = rng.uniform(7.5, 8.5) * scale
    cx = 32 + side * min(offset, max(11.0, 30 - r))
    spread = 8 * (scale - 1)  # two copies stacked: keep them apart
    return [(rng.uniform(18, 21) - spread, cx + rng.uniform(-2, 2), r),
            (rng.uniform(43, 47) + spread / 2, cx + rng.uniform(-2, 2), r)]


def _draw(look: Look, scene: Scene, rng: np.random.Generator, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The supersampled float image of a scene and the boolean mask of its objects' silhouettes."""
    img = _background(scene.background, rng)
    mask = np.zeros(_YY.shape, dtype=bool)
    body = np.array(PALETTE[look.body], dtype=np.float32)
    pc = np.array(PALETTE[look.pattern_colour], dtype=np.float32) if look.pattern_colour else body
    for cy, cx, r in _layout(scene, rng, scale):
        w = _window(cy + 0.6, cx + 0.6, 1.1 * r + 0.6)  # the silhouette (|dy|, |dx| <= 1.1 r) and its shadow
        dy, dx = _YY[w] - cy, _XX[w] - cx
        sil = _silhouette(look.shape, dy, dx, r)
        # a soft shadow under the object, then the object
        shadow = _silhouette(look.shape, dy - 1.2, dx - 1.2, r) & ~sil
        view = img[w]
        np.multiply(view, 0.7, out=view, where=shadow[..., None])
        np.copyto(view, body, where=sil[..., None])
        np.copyto(view, pc, where=(sil & _pattern(look.pattern, dy, dx, r))[..., None])
        mask[w] |= sil
    return img, mask


def _box_filter(a: np.ndarray) -> np.ndarray:
    """Supersampled -> 64x64 by averaging each SUPERSAMPLE x SUPERSAMPLE block (antialiasing)."""
    n = IMAGE_SIZE
    return a.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE, *a.shape[2:]).mean(axis=(1, 3))


def render_scene(look: Look, scene: Scene, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    return np.clip(np.round(_box_filter(_draw(look, scene, rng, scale)[0])), 0, 255).astype(np.uint8)


def render_mask(look: Look, scene: Scene, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """The 64x64 float mask (coverage in [0, 1]) of the objects that ``render_scene`` draws with the same
    ``rng`` state: the entity's pixels, where its look shows (``toyworld.diagnose``)."""
    return _box_filter(_draw(look, scene, rng, scale)[1].astype(np.float32))


def entity_masks(world: World, scenes: Sequence[Scene], key: str) -> np.ndarray:
    """(N, 64, 64) masks of the entities in ``render_many(world, scenes, key)``'s images, image for image."""
    return np.stack([render_mask(world.by_id[s.entity].look, s, _rng(world.spec.seed, "render", key, i),
                                 world.spec.object_scale) for i, s in enumerate(scenes)])


def scene_attributes(world: World, scene: Scene) -> dict[str, object]:
    """The ground-truth attribute labels of a scene (what the judge is trained to read back)."""
    look = world.by_id[scene.entity].look
    return {"shape": look.shape, "body": look.body, "pattern": look.pattern, "pattern_colour": look.pattern_colour,
            "background": scene.background, "count": scene.count, "position": scene.position}


def _render_chunk(args: tuple) -> np.ndarray:
    spec, looks, scenes, key, start = args
    return np.stack([render_scene(looks[s.entity], s, _rng(spec.seed, "render", key, start + i), spec.object_scale)
                     for i, s in enumerate(scenes)])


def render_many(world: World, scenes: Iterable[Scene], key: str, workers: int | None = None) -> np.ndarray:
    """Render scenes to an (N, 64, 64, 3) uint8 array; image ``i`` is seeded by (key, i), so the result does not
    depend on ``workers`` (default: one process per CPU core for large batches)."""
    import os

    scenes = list(scenes)
    looks = {e.id: e.look for e in world.entities}
    workers = workers if workers is not None else (os.cpu_count() or 1) if len(scenes) >= 2000 else 1
    chunk = 500
    jobs = [(world.spec, looks, scenes[i:i + chunk], key, i) for i in range(0, len(scenes), chunk)]
    if workers <= 1 or len(jobs) <= 1:
        parts = [_render_chunk(j) for j in jobs]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs)
    return np.concatenate(parts) if parts else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


__all__ = ["World", "WorldSpec", "V3_OBJECT_SCALE", "rebuild_world", "BenchPrompt", "Entity", "Look", "Scene", "render_scene", "render_many", "scene_attributes",
           "SHAPES", "BODY_COLOURS", "PATTERNS", "PATTERN_COLOURS", "BACKGROUNDS", "POSITIONS", "COUNTS",
           "LOOK_ATTRIBUTES", "SCENE_ATTRIBUTES", "ATTRIBUTE_CLASSES", "IMAGE_SIZE"]
