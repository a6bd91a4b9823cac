"""The page: input column (image, trajectories, settings, buttons) and result column (status; point cloud,
splats and the 3D camera-path editor; clip / GGM render / hole mask / depth videos; undo; evaluation; downloads).
Behaviour lives in the callbacks: ``demo.generation``, ``demo.downloads``, ``demo.viewer``, ``demo.editing``,
``demo.evaluation`` (``demo.context`` says what they share)."""
from __future__ import annotations

import gradio as gr

from demo import context, editing, evaluation, generation, viewer
from demo.downloads import show_clip
from demo.generation import GenerationInputs
from engine.constants import KEYFRAMES
from engine.geometry import trajectories as traj
from engine.offload import OFFLOAD_CHOICES, offload_help_text

CSS = """
#banner {border-left: 4px solid #f59e0b; padding: 4px 12px; background: rgba(245, 158, 11, 0.08);}
#status {min-height: 3em;}
"""
DEFAULT_TRAJECTORIES = ["left", "right"]
ENGINE_QUEUE = "engine"  # one concurrency group for everything that runs depth or generation
# Everything else that decodes, reads or draws a person's file (upload checks, camera files for the editor, path
# previews, viewer files): a second group, so its memory is bounded by a few requests at once, never by how many
# people press at the same moment (an upload check decodes within engine.images.CHECK_BYTES).
CHECK_QUEUE, CHECKS_AT_ONCE = "checks", 2
IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".webp")


def _trajectory_help() -> str:
    rows = [f"- **{s.name}** ({'degrees' if s.kind == 'angle' else '× median depth'}, default {s.amount:g}): {s.description}"
            for s in traj.PRESETS.values()]
    return "\n".join(rows)


def build_demo(ctx: context.AppContext, max_concurrent: int = 1) -> gr.Blocks:
    with gr.Blocks(title="WorldStereo Studio", delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown("# WorldStereo Studio\nOne photo or one 360° panorama in: camera-guided videos along the "
                    "trajectories you choose, and one consistent 3D point cloud out.")
        banner = gr.Markdown(generation.banner_markdown(ctx.default_engine, ctx.startup_note), elem_id="banner")
        state = gr.State({})
        with gr.Row():
            with gr.Column(scale=1, min_width=360):
                # file_types is checked by the server too (by extension); the engine's loader checks the content.
                image = gr.File(label="Photo or 360° panorama (PNG, JPEG, WebP)", file_count="single",
                                file_types=list(IMAGE_TYPES), type="filepath", elem_id="input-file")
                preview = gr.Image(label="Input", interactive=False, height=180, elem_id="input-preview")
                input_info = gr.Markdown(elem_id="input-info")
                panorama = gr.Checkbox(label="360° panorama (equirectangular)", value=False, elem_id="panorama",
                                       info="Set automatically for 2:1 images; change it if the guess is wrong.")
                if ctx.examples:
                    gallery = gr.Gallery(value=[(str(e.thumbnail), e.label) for e in ctx.examples], label="Examples",
                                         columns=len(ctx.examples), height=140, allow_preview=False,
                                         elem_id="examples")
                # Offered by an example that holds an official scene (demo.generation.example_run_choices).
                run_as = gr.Radio(generation.all_run_choices(ctx), value="", visible=False, label="Run this example",
                                  elem_id="run-as")
                presets = gr.CheckboxGroup(list(traj.PRESETS), value=DEFAULT_TRAJECTORIES, label="Camera paths",
                                           elem_id="trajectories")
                views = gr.CheckboxGroup(list(generation.PANORAMA_VIEWS), value=["view0"], visible=False,
                                         label="Panorama start views (front, right, back, left)", elem_id="views")
                frames = gr.Slider(2, 81, value=KEYFRAMES, step=1, label="Frames per clip", elem_id="frames")
                with gr.Accordion("Camera amounts, camera.json, planned paths", open=False, elem_id="camera-more"):
                    angle = gr.Slider(0, 720, value=0, step=5, label="Angle in degrees (0 = each preset's own)",
                                      elem_id="angle")
                    distance = gr.Slider(0, 2, value=0, step=0.05,
                                         label="Distance in median depths (0 = each preset's own)", elem_id="distance")
                    camera_json = gr.File(label="Official camera.json (optional, generated as one more clip)",
                                          file_types=[".json"], type="filepath", height=120, elem_id="camera-json")
                    plan_btn = gr.Button("Show planned paths", elem_id="plan")
                    gr.Markdown(_trajectory_help())
                prompt = gr.Textbox(label="Prompt (optional)", lines=1, elem_id="prompt")
                traj_prompts = gr.Textbox(label="Prompt per trajectory (optional): one NAME=TEXT per line, e.g. "
                                          "left=a corridor seen from the left", lines=2, elem_id="trajectory-prompts")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", minimum=0, elem_id="seed")
                    engine = gr.Dropdown(generation.engine_choices(ctx.weights), value=ctx.default_engine,
                                         label="Engine", elem_id="engine")
                quality = gr.Radio([("Fast: DMD, 4 steps", generation.FAST),
                                    ("Quality: UniPC + guidance, 40 steps", generation.QUALITY)],
                                   value=generation.FAST, label="Quality / speed (full model only)", elem_id="quality")
                offload = gr.Dropdown(list(OFFLOAD_CHOICES), value=OFFLOAD_CHOICES[0],
                                      label="GPU memory (generative engines, new scenes)", info=offload_help_text(),
                                      elem_id="offload")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    continue_btn = gr.Button("Continue this scene", elem_id="continue")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                with gr.Accordion("Resume an unfinished scene", open=False, elem_id="resume-more"):
                    resume_id = gr.Textbox(label="Scene id (the 16 characters after “Scene” in the status line)",
                                           max_lines=1, max_length=64, elem_id="resume-id")
                    resume_btn = gr.Button("Resume", elem_id="resume")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                with gr.Tabs(elem_id="views-tabs"):
                    with gr.Tab("Point cloud", id="points", elem_id="tab-points"):
                        model3d = gr.Model3D(label="3D point cloud (planned paths before generating)", height=460,
                                             clear_color=(0.08, 0.08, 0.1, 1.0), display_mode="point_cloud",
                                             elem_id="viewer")
                    with gr.Tab("Splats", id="splats", elem_id="tab-splats"):
                        splats = gr.Model3D(label="Gaussian splats (scene_splats.ply)", height=460,
                                            clear_color=(0.08, 0.08, 0.1, 1.0), elem_id="splats")
                    with gr.Tab("3D camera-path editor", id="editor", elem_id="tab-editor"):
                        editor_frame = gr.HTML("<p>Press <b>Open the 3D editor</b> to place camera keyframes over the "
                                               "point cloud.</p>", elem_id="editor")
                        with gr.Row():
                            editor_btn = gr.Button("Open the 3D editor", elem_id="editor-open")
                            path_preview_btn = gr.Button("Preview path", elem_id="path-preview")
                            path_generate_btn = gr.Button("Generate this path", variant="primary",
                                                          elem_id="path-generate")
                            path_save_btn = gr.Button("Save camera.json", elem_id="path-save")
                        with gr.Row():
                            path_video = gr.Video(label="Path preview (the 3D cache along the path)", autoplay=True,
                                                  loop=True, height=240, elem_id="path-video")
                            with gr.Column():
                                path_file = gr.File(label="Path as camera.json", interactive=False,
                                                    elem_id="path-file")
                                path_upload = gr.File(label="Load a camera.json into the editor", file_types=[".json"],
                                                      type="filepath", height=100, elem_id="path-upload")
                confidence = gr.Slider(0, 1, value=0, step=0.05, label="Hide points below confidence (0 shows all)",
                                       info="1 = depth of the input or of a generated frame; 0.5 = guessed colour or "
                                            "depth (preview inpainting, holes filled without a depth model); "
                                            "points beyond 4× the median depth count less the farther they are.",
                                       elem_id="confidence")
                with gr.Row():
                    clip_video = gr.Video(label="Clip", autoplay=True, loop=True, elem_id="clip-video")
                    render_video = gr.Video(label="GGM render (point cloud along the path)", autoplay=True, loop=True,
                                            elem_id="render-video")
                    mask_video = gr.Video(label="Hole mask (white = to generate)", autoplay=True, loop=True,
                                          elem_id="mask-video")
                    depth_video = gr.Video(label="Depth (near = red, far = blue)", autoplay=True, loop=True,
                                           elem_id="depth-video")
                with gr.Row():
                    clip_choice = gr.Dropdown([], label="Show clip", elem_id="clip-choice", scale=3)
                    undo_btn = gr.Button("Remove last clip", elem_id="undo", scale=1)
                    evaluate_btn = gr.Button("Evaluate", elem_id="evaluate", scale=1)
                evaluation_status = gr.Markdown(elem_id="evaluation-status")
                evaluation_table = gr.Dataframe(label="Camera accuracy per clip", interactive=False, visible=False,
                                                elem_id="evaluation-table")
                evaluation_plot = gr.Image(label="Asked vs recovered camera paths", show_label=False, type="filepath",
                                           interactive=False, visible=False, elem_id="evaluation-plot")
                downloads = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")

        inputs = [state, image, panorama, presets, views, angle, distance, frames, camera_json, prompt, seed, engine,
                  quality, offload, run_as, traj_prompts]
        by_key = {"state": state, "status": status, "banner": banner, "model3d": model3d, "splats": splats,
                  "clip_video": clip_video, "render_video": render_video, "mask_video": mask_video,
                  "depth_video": depth_video, "clip_choice": clip_choice, "downloads": downloads}
        outputs = [by_key[k] for k in generation.OUTPUT_KEYS]

        def gather(st, img, pano, pre, vw, ang, dist, fr, cj, pr, sd, eng, q, off, ra,
                   tp) -> tuple[dict, GenerationInputs]:
            return st or {}, GenerationInputs(image=img, panorama=bool(pano), trajectories=pre or [], views=vw or [],
                                              angle=ang or 0, distance=dist or 0, frames=int(fr or KEYFRAMES),
                                              camera_json=cj, prompt=pr or "", seed=int(sd or 0), engine=eng,
                                              quality=q or generation.FAST, offload=off or OFFLOAD_CHOICES[0],
                                              official=ra or "", trajectory_prompts=tp or "")

        def as_tuple(update: dict) -> tuple:
            return tuple(update.get(k, gr.skip()) for k in generation.OUTPUT_KEYS)

        def session_of(request: gr.Request) -> str:
            return getattr(request, "session_hash", None) or "-"

        def run(continue_scene: bool):
            # Explicit parameters: gradio injects Request / Progress by signature, which *args would hide.
            @context.logged
            def handler(st, img, pano, pre, vw, ang, dist, fr, cj, pr, sd, eng, q, off, ra, tp, request: gr.Request,
                        progress=gr.Progress()):
                st, inp = gather(st, img, pano, pre, vw, ang, dist, fr, cj, pr, sd, eng, q, off, ra, tp)
                for update in generation.generate(ctx, st, inp, session=session_of(request),
                                                  continue_scene=continue_scene, progress=progress):
                    yield as_tuple(update)
            return handler

        @context.logged
        def on_upload(path):
            shown, pano, info = generation.inspect_upload(path)
            return shown, pano if path else gr.skip(), info

        def on_panorama(pano):
            return gr.update(visible=bool(pano))

        @context.logged
        def on_plan(st, img, pano, pre, vw, ang, dist, fr, cj, pr, sd, eng, q, off, ra, tp, progress=gr.Progress()):
            st, inp = gather(st, img, pano, pre, vw, ang, dist, fr, cj, pr, sd, eng, q, off, ra, tp)
            st, glb, legend = generation.plan_paths(ctx, st, inp, progress=progress)
            return st, glb, legend

        @context.logged
        def on_resume(st, job_id, request: gr.Request, progress=gr.Progress()):
            for update in generation.resume(ctx, st or {}, job_id, session=session_of(request), progress=progress):
                yield as_tuple(update)

        def on_cancel(request: gr.Request):
            return generation.cancel(ctx, session_of(request))

        @context.logged
        def on_clip(st, name):
            return show_clip(ctx, st, name)

        @context.logged
        def on_editor(st, img, pano, pre, vw, ang, dist, fr, cj, pr, sd, eng, q, off, ra, tp, request: gr.Request,
                      progress=gr.Progress()):
            st, inp = gather(st, img, pano, pre, vw, ang, dist, fr, cj, pr, sd, eng, q, off, ra, tp)
            return editing.open_editor(ctx, st, inp, session=session_of(request), progress=progress)

        @context.logged
        def on_path_preview(st, fr, request: gr.Request):
            return editing.preview_path(ctx, st, int(fr or KEYFRAMES), session=session_of(request))

        @context.logged
        def on_path_save(st, fr, request: gr.Request):
            return editing.save_editor_path(ctx, st, int(fr or KEYFRAMES), session=session_of(request))

        @context.logged
        def on_path_upload(st, path, request: gr.Request):
            return editing.load_editor_path(ctx, st, path, session=session_of(request))

        @context.logged
        def on_path_generate(st, fr, request: gr.Request, progress=gr.Progress()):
            for update in editing.generate_path(ctx, st, int(fr or KEYFRAMES), session=session_of(request),
                                                progress=progress):
                yield as_tuple(update)

        @context.logged
        def on_undo(st, request: gr.Request):
            return as_tuple(editing.remove_last_clip(ctx, st, session=session_of(request)))

        @context.logged
        def on_confidence(st, value):
            return viewer.set_confidence(ctx, st, value)

        evaluation_panel = [evaluation_status, evaluation_table, evaluation_plot]

        @context.logged
        def on_evaluate(st, progress=gr.Progress()):
            update = evaluation.evaluate(ctx, st, progress=progress)
            return tuple(update[k] for k in evaluation.EVALUATION_KEYS)

        def on_scene_change(st):
            update = evaluation.evaluation_panel(ctx, st)
            return tuple(update[k] for k in evaluation.PANEL_KEYS)

        def on_unload(request: gr.Request):
            editing.close_session(ctx, session_of(request))

        # A file the engine cannot read is removed again after its error, so the next upload can follow at once.
        checks = dict(concurrency_id=CHECK_QUEUE, concurrency_limit=CHECKS_AT_ONCE)
        image.change(on_upload, [image], [preview, panorama, input_info], **checks,
                     api_name="inspect_upload").failure(
            lambda: (None, None, ""), None, [image, preview, input_info], concurrency_limit=None)
        panorama.change(on_panorama, [panorama], [views], concurrency_limit=None)
        if ctx.examples:
            @context.logged
            def on_example(evt: gr.SelectData):
                path, pano, text, cam = generation.pick_example(ctx, evt.index)
                choices, offered = generation.example_run_choices(ctx, evt.index)
                return path, pano, text, gr.update(choices=choices, value="", visible=offered)

            gallery.select(on_example, None, [image, panorama, prompt, run_as], concurrency_limit=None)
        # A file of one's own runs the paths chosen here, never an example's official scene.
        image.upload(lambda: gr.update(choices=[(generation.OWN_CHOICE, "")], value="", visible=False), None, [run_as],
                     concurrency_limit=None)
        # Explicit api_names: the endpoints scripts (gradio_client) and the server tests call by name.
        plan_btn.click(on_plan, inputs, [state, model3d, status], concurrency_id=ENGINE_QUEUE,
                       concurrency_limit=max_concurrent, api_name="plan")
        generate_btn.click(run(False), inputs, outputs, concurrency_id=ENGINE_QUEUE, concurrency_limit=max_concurrent,
                           api_name="generate")
        continue_btn.click(run(True), inputs, outputs, concurrency_id=ENGINE_QUEUE, concurrency_limit=max_concurrent,
                           api_name="continue_scene")
        resume_btn.click(on_resume, [state, resume_id], outputs, concurrency_id=ENGINE_QUEUE,
                         concurrency_limit=max_concurrent, api_name="resume")
        cancel_btn.click(on_cancel, None, [status], concurrency_limit=None, api_name="cancel")
        clip_choice.input(on_clip, [state, clip_choice], [clip_video, render_video, mask_video, depth_video],
                          concurrency_limit=None, api_name="show_clip")
        editor_btn.click(on_editor, inputs, [state, editor_frame, status], concurrency_id=ENGINE_QUEUE,
                         concurrency_limit=max_concurrent, api_name="open_editor")
        path_preview_btn.click(on_path_preview, [state, frames], [path_video], **checks, api_name="preview_path")
        path_save_btn.click(on_path_save, [state, frames], [path_file], **checks, api_name="save_path")
        path_upload.upload(on_path_upload, [state, path_upload], [status], **checks, api_name="load_path")
        path_generate_btn.click(on_path_generate, [state, frames], outputs, concurrency_id=ENGINE_QUEUE,
                                concurrency_limit=max_concurrent, api_name="generate_path")
        undo_btn.click(on_undo, [state], outputs, concurrency_id=ENGINE_QUEUE, concurrency_limit=max_concurrent,
                       api_name="remove_last_clip")
        confidence.release(on_confidence, [state, confidence], [state, model3d, splats], **checks,
                           api_name="set_confidence")
        evaluate_btn.click(on_evaluate, [state], evaluation_panel + [downloads],
                           concurrency_id=evaluation.EVALUATE_QUEUE, concurrency_limit=evaluation.EVALUATIONS_AT_ONCE,
                           api_name="evaluate")
        # Every run and undo writes the status line: the panel then says what the evaluation judged of the scene now.
        status.change(on_scene_change, [state], evaluation_panel, concurrency_limit=None, show_progress="hidden")
        demo.unload(on_unload)
    demo.queue(default_concurrency_limit=max_concurrent)
    return demo
