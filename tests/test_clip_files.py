from pathlib import Path

from daemon.clips import Clip, read_clip_file


def test_zero_padded_and_plain_integers_are_frame_pairs(tmp_path: Path) -> None:
    path = tmp_path / "v.txt"
    path.write_text("0000010 0000050\n100 140\n\n")
    parsed = read_clip_file(path)
    assert parsed.clips == [Clip(10, 50), Clip(100, 140)]
    assert parsed.problems == []


def test_bad_lines_are_reported_with_file_and_line_and_the_rest_kept(tmp_path: Path) -> None:
    path = tmp_path / "v.txt"
    path.write_text("0 10\nten 20\n30 20\n-5 10\n1 2 3\n40 40\n50 60\n50 60\n")
    parsed = read_clip_file(path)
    assert parsed.clips == [Clip(0, 10), Clip(50, 60)]
    where = [problem.split(": ")[0] for problem in parsed.problems]
    assert where == [f"{path}:{n}" for n in (2, 3, 4, 5, 6, 8)]
    assert "not after start" in parsed.problems[1]
    assert "negative" in parsed.problems[2]


def test_frame_count_follows_the_output_rate() -> None:
    from fractions import Fraction

    clip = Clip(10, 50)  # 40 frames at 30 fps = 1.333 s
    assert clip.frame_count(Fraction(30), Fraction(30)) == 40
    assert clip.frame_count(Fraction(30), Fraction(25)) == 33  # 33.33 rounds down
    assert Clip(0, 3).frame_count(Fraction(30), Fraction(25)) == 3  # 2.5 rounds up
    assert clip.file_name("abc") == "abc_0000010_0000050.hevc"
