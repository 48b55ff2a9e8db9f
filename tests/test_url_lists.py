from pathlib import Path

from daemon.urls import parse_url_list, video_id_for


def test_comments_blanks_and_duplicates_are_dropped_and_bad_lines_named(tmp_path: Path) -> None:
    local = tmp_path / "local clip.mp4"
    local.write_bytes(b"x")
    listing = tmp_path / "urls.txt"
    listing.write_text(
        "# a comment\n"
        "\n"
        "https://www.youtube.com/watch?v=mJ90XoEPbjA\n"
        "https://youtu.be/mJ90XoEPbjA\n"
        "https://www.youtube.com/watch?v=mJ90XoEPbjA\n"
        "ftp://example.com/x.mp4\n"
        "local clip.mp4\n"
        "/no/such/file.mp4\n"
        "http://127.0.0.1:8000/clips/abc.mp4\n"
    )
    parsed = parse_url_list(listing)
    assert [s.video_id for s in parsed.sources] == ["mJ90XoEPbjA", "mJ90XoEPbjA", "local_clip", "abc"]
    assert [s.line for s in parsed.sources] == [3, 4, 7, 9]
    assert parsed.sources[2].is_local and parsed.sources[2].url == str(local)
    assert [p.split(": ")[0] for p in parsed.problems] == [f"{listing}:6", f"{listing}:8"]


def test_ids_match_what_yt_dlp_names_the_video() -> None:
    assert video_id_for("https://www.youtube.com/shorts/8ls8xBn70gM") == "8ls8xBn70gM"
    assert video_id_for("http://127.0.0.1:9/media/walk.webm") == "walk"
    assert video_id_for("http://127.0.0.1:9/media/walk.mp4?token=1") == "walk"
