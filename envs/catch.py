"""Catch: a tiny pixel game whose dynamics a world model can learn in minutes on a CPU.

A ball falls one cell per step from a random column at the top of an 8×8 grid; a 3-cell paddle on the
bottom row moves left / stays / moves right. The ball's fall is deterministic but where the next ball
appears is not, so a model must learn both crisp deterministic motion and a stochastic future.

Timeline of one ball (``GRID = 8``):

* the ball appears on row 0 and falls one row per step, reaching the paddle row after GRID − 1 steps;
* on that step the reward is given (+1 caught, −1 missed) and the frame shows the ball *in* the
  paddle row (drawn over the paddle when caught, beside it when missed), so the outcome is visible;
* on the next step the ball respawns on row 0 at a new random column.

Measured returns (``num_balls=10, max_misses=3``, 100 seeded episodes): the scripted expert catches every
ball (+10.0); epsilon-expert (ε = 0.3) +8.2; uniformly random actions about −1.2 (see ``docs/envs.md``).
The grid is 8×8 so that at 64×64 pixels every sprite cell is exactly one 8×8 tokenizer patch.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from worldflow.errors import InputError

GRID = 8  # internal grid is GRID × GRID cells; each cell is size // GRID pixels
PADDLE_HALF = 1  # paddle covers columns [centre - 1, centre + 1]
PADDLE_ROW = GRID - 1
BALL_COLOUR = np.array([255, 64, 64], dtype=np.uint8)  # red
PADDLE_COLOUR = np.array([64, 160, 255], dtype=np.uint8)  # blue: differs from the ball in every channel

LEFT, STAY, RIGHT = 0, 1, 2


def _cell_pixels(frames: np.ndarray, caller: str) -> np.ndarray:
    """Frames (..., S, S, 3), uint8 or float in [0, 1], as float pixels in [0, 255] grouped by grid cell:
    (..., GRID, c, GRID, c, 3) with c = S // GRID (row, y in the cell, column, x in the cell, RGB)."""
    f = np.asarray(frames, dtype=np.float32)
    if f.max(initial=0.0) <= 1.0:
        f = f * 255.0
    size = f.shape[-2]
    if f.shape[-3] != size or size % GRID:
        raise ValueError(f"{caller}: frames must be square, side divisible by {GRID}; got {f.shape}")
    c = size // GRID
    return f.reshape(*f.shape[:-3], GRID, c, GRID, c, 3)


def read_objects(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Where the objects are in rendered (or predicted) Catch frames, cell by cell.

    frames: ``(..., S, S, 3)`` uint8 in [0, 255] or float in [0, 1], S a multiple of GRID (no border).
    Returns ``ball`` ``(..., GRID, GRID)`` bool (cells whose mean colour is ball-red) and ``paddle``
    ``(..., GRID)`` bool (paddle-row cells that are paddle-blue). A cell counts when its mean colour is
    nearer the sprite colour than to black in the channels that tell them apart, so a faint or smeared
    prediction reads as empty: this is what lets evaluation ask "is the ball where it should be?".
    """
    cells = _cell_pixels(frames, "read_objects").mean(axis=(-4, -2))  # (..., GRID, GRID, 3)
    ball = (cells[..., 0] > BALL_COLOUR[0] / 2) & (cells[..., 2] < PADDLE_COLOUR[2] / 2)
    paddle = (cells[..., PADDLE_ROW, :, 2] > PADDLE_COLOUR[2] / 2) & (cells[..., PADDLE_ROW, :, 0] < 160)
    return {"ball": ball, "paddle": paddle}


PALETTE = np.array([[0, 0, 0], BALL_COLOUR, PADDLE_COLOUR], dtype=np.float32)  # background, ball, paddle
CRISP_TOLERANCE = 48.0  # a cell is crisp when every pixel is within this (max over RGB) of its palette colour


def frame_validity(frames: np.ndarray) -> np.ndarray:
    """Whether each frame is one a real Catch game can show: bool ``(...)`` for frames ``(..., S, S, 3)``
    (uint8, or float in [0, 1]).

    Valid means all of: every cell is *crisp*, one palette colour (black, ball red or paddle blue) to
    within ``CRISP_TOLERANCE`` in every pixel, so a faint or smeared sprite fails; exactly one ball cell;
    no paddle colour off the paddle row; and the paddle row's paddle cells, together with the ball when it
    sits on the paddle (a catch is drawn over it), form one run of 3 cells. PSNR cannot tell
    a sharp wrong frame from a blurred average of two right ones; this can.
    """
    cells = _cell_pixels(frames, "frame_validity")  # (..., row, y, col, x, 3)
    # distance of every pixel to each palette colour; a cell takes the colour nearest its mean
    mean = cells.mean(axis=(-4, -2))  # (..., GRID, GRID, 3)
    colour = np.abs(mean[..., None, :] - PALETTE).max(-1).argmin(-1)  # (..., GRID, GRID) in {0, 1, 2}
    target = PALETTE[colour]  # (..., GRID, GRID, 3)
    dev = np.abs(cells - target[..., :, None, :, None, :]).max(-1)  # (..., row, y, col, x)
    crisp = (dev <= CRISP_TOLERANCE).all(axis=(-1, -2, -3, -4))
    ball, paddle = colour == 1, colour == 2
    one_ball = ball.sum(axis=(-1, -2)) == 1
    paddle_only_in_its_row = ~np.delete(paddle, PADDLE_ROW, axis=-2).any(axis=(-1, -2))
    width = 2 * PADDLE_HALF + 1
    pad = paddle[..., PADDLE_ROW, :]
    with_ball = pad | ball[..., PADDLE_ROW, :]
    whole = (pad.sum(-1) == width) & _one_run(pad)  # no ball over the paddle
    caught = (pad.sum(-1) == width - 1) & (with_ball.sum(-1) == width) & _one_run(with_ball)
    return crisp & one_ball & paddle_only_in_its_row & (whole | caught)


def _one_run(row: np.ndarray) -> np.ndarray:
    """Whether the True cells of a (..., GRID) bool row are contiguous (one run; an empty row is not)."""
    starts = row & ~np.concatenate([np.zeros_like(row[..., :1]), row[..., :-1]], axis=-1)
    return starts.sum(-1) == 1


class CatchEnv(gymnasium.Env):
    """Catch the falling balls with a paddle.

    Observation: ``uint8`` array of shape ``(size, size, 3)``; black background, red ball, blue paddle.
    Actions: ``Discrete(3)`` — 0 left, 1 stay, 2 right (one cell per step; blocked only by the walls).
    Reward: +1 when a ball reaches the paddle row inside the paddle, −1 when it misses, else 0.
    Termination: after ``num_balls`` balls resolved or ``max_misses`` misses, whichever is first.
    Truncation: by the ``TimeLimit`` that ``gymnasium.make`` adds (``max_episode_steps=1000``).

    ``info`` holds ``caught``, ``missed`` and ``balls`` (counts so far) after every reset and step.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}

    def __init__(
        self,
        size: int = 64,
        num_balls: int = 10,
        max_misses: int = 3,
        render_mode: str | None = None,
    ) -> None:
        if size < GRID:
            raise InputError(f"CatchEnv: size must be >= {GRID} pixels, got {size}")
        if num_balls < 1 or max_misses < 1:
            raise InputError(f"CatchEnv: num_balls, max_misses must be >= 1, got {num_balls}, {max_misses}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise InputError(f"CatchEnv: unsupported render_mode {render_mode!r}; use 'rgb_array' or None")
        self.size = size
        self.num_balls = num_balls
        self.max_misses = max_misses
        self.render_mode = render_mode
        self.observation_space = spaces.Box(0, 255, shape=(size, size, 3), dtype=np.uint8)
        self.action_space = spaces.Discrete(3)
        self._cell = size // GRID
        # Sizes that are not a multiple of GRID keep integer cells and centre the grid in a black border.
        self._offset = (size - GRID * self._cell) // 2
        self._ball_row = 0
        self._ball_col = 0
        self._paddle = GRID // 2
        self._caught = 0
        self._missed = 0
        self._frame: np.ndarray | None = None

    # ------------------------------------------------------------------ gymnasium API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, int]]:
        super().reset(seed=seed)
        self._caught = 0
        self._missed = 0
        self._paddle = int(self.np_random.integers(PADDLE_HALF, GRID - PADDLE_HALF))
        self._spawn_ball()
        return self._observe(), self._info()

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, int]]:
        if not self.action_space.contains(action):
            raise InputError(f"CatchEnv: invalid action {action!r}; expected 0 (left), 1 (stay) or 2 (right)")
        if self._frame is None:
            raise RuntimeError("CatchEnv: call reset() before step()")
        self._move_paddle(int(action))
        reward = 0.0
        if self._ball_row == PADDLE_ROW:
            # The previous step resolved this ball (and showed it in the paddle row); start the next one.
            self._spawn_ball()
        else:
            self._ball_row += 1
            if self._ball_row == PADDLE_ROW:
                reward = self._resolve_ball()
        terminated = self._caught + self._missed >= self.num_balls or self._missed >= self.max_misses
        return self._observe(), reward, terminated, False, self._info()

    def render(self) -> np.ndarray | None:
        """The current frame, ``uint8 (size, size, 3)`` (a copy), or None before the first reset."""
        return None if self._frame is None else self._frame.copy()

    # ------------------------------------------------------------------ scripted expert

    def expert_action(self) -> int:
        """Move the paddle centre toward the ball's column (clipped to where the centre can go).

        With a 3-cell paddle the centre needs at most ``GRID - 3`` moves to reach any column, fewer than the
        ``GRID - 1`` steps a ball takes to fall, so this policy catches every ball.
        """
        target = int(np.clip(self._ball_col, PADDLE_HALF, GRID - 1 - PADDLE_HALF))
        if target < self._paddle:
            return LEFT
        if target > self._paddle:
            return RIGHT
        return STAY

    # ------------------------------------------------------------------ internals

    def _spawn_ball(self) -> None:
        self._ball_row = 0
        self._ball_col = int(self.np_random.integers(0, GRID))

    def _move_paddle(self, action: int) -> None:
        self._paddle = int(np.clip(self._paddle + action - 1, PADDLE_HALF, GRID - 1 - PADDLE_HALF))

    def _resolve_ball(self) -> float:
        if abs(self._ball_col - self._paddle) <= PADDLE_HALF:
            self._caught += 1
            return 1.0
        self._missed += 1
        return -1.0

    def _info(self) -> dict[str, int]:
        return {"caught": self._caught, "missed": self._missed, "balls": self._caught + self._missed}

    def _observe(self) -> np.ndarray:
        """Draw the grid and upscale it by whole cells (nearest neighbour) so edges stay crisp."""
        grid = np.zeros((GRID, GRID, 3), dtype=np.uint8)
        grid[PADDLE_ROW, self._paddle - PADDLE_HALF : self._paddle + PADDLE_HALF + 1] = PADDLE_COLOUR
        grid[self._ball_row, self._ball_col] = BALL_COLOUR  # drawn last: a caught ball shows over the paddle
        cells = grid.repeat(self._cell, axis=0).repeat(self._cell, axis=1)
        frame = np.zeros((self.size, self.size, 3), dtype=np.uint8)
        o, n = self._offset, GRID * self._cell
        frame[o : o + n, o : o + n] = cells
        self._frame = frame
        return frame.copy()  # callers may keep or mutate observations; never hand out our buffer
