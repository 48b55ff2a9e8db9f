"""One source video in, one HEVC stream per clip out: decode once, run the stages, encode.

`ClipCutter.run_in_one_pass` is the frame loop: frames (a walk along the clips, daemon.walk) →
schedule (which clips show each frame, daemon.timing) → pictures (as the stages and the encoder want
them, daemon.pictures) → writers (one per clip, on a lane of its own when it has one,
daemon.writers). With several lanes, clips the index keeps apart are cut in parts (daemon.parts),
each such pass on a lane of its own.

The cutter is given its parts (daemon.cutting.CutterParts, assembled by daemon.backends) and
decides nothing from them: it knows the decoder, the encoder and the stages only by their protocols.
"""

from __future__ import annotations

from daemon.cutting import CutJob, CutterParts, VideoOutcome
from daemon.parts import SeparateParts, separate
from daemon.pictures import PicturePlan
from daemon.timing import FrameSchedule
from daemon.walk import FrameWalk
from daemon.writers import OpenClips


class ClipCutter:
    """Cuts every clip of one source in a single forward pass over its frames (or in parts, side by
    side, where its parts allow it and the source's index keeps clips apart)."""

    def __init__(self, parts: CutterParts) -> None:
        self.parts = parts

    def run(self, job: CutJob) -> VideoOutcome:
        # Parts of a source still arriving would wait for their bytes before the first clip is cut:
        # telling parts apart looks up every clip's keyframe in the index first.
        if self.parts.decodes_in_parts and self.parts.lanes > 1 and not job.arriving:
            groups = separate(self.parts, job)
            if len(groups) > 1:
                one_part = ClipCutter(self.parts.for_one_part())
                return SeparateParts(groups, self.parts.lanes, one_part.run_in_one_pass).run(job)
        return self.run_in_one_pass(job)

    def run_in_one_pass(self, job: CutJob) -> VideoOutcome:
        """One decoder along every clip; clips go to lanes, with the pictures queued for them."""
        parts = self.parts
        schedule = FrameSchedule(job.clips, parts.clip_fps, parts.fps)
        open_clips = OpenClips(parts, job)
        try:
            with parts.open(job.source_path) as source:
                plan = PicturePlan.choose(
                    parts.stages, source, parts.encoders.accepts, parts.width, parts.height
                )
                walk = FrameWalk(
                    source,
                    schedule,
                    parts.seek_threshold_seconds,
                    job.should_stop,
                    on_decoded=job.sink.frame_decoded,
                )
                for shown in walk:
                    open_clips.collect()
                    # Each clip this frame shows in, and how many times (a slower source's frame
                    # is shown again; a faster one's may be skipped).
                    showings = schedule.take(shown.frame.pts_seconds, shown.end_seconds, shown.first)
                    if showings:
                        open_clips.show(plan, shown.frame, showings)
            open_clips.collect(wait=True)
        except BaseException:
            open_clips.abort()
            raise
        open_clips.lanes.stop()
        open_clips.end(schedule, walk)
        return VideoOutcome(results=open_clips.results, interrupted=walk.interrupted)
