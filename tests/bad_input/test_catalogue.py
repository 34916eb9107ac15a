"""The catalogue of bad input, kill points and concurrent runs that the suite tests, with
nothing lost in any of them. README.md's "Reliability" section quotes its totals; the tests
below keep the two honest: every row names a test that exists, its case count is that test's
number of parametrised cases, and the README's figures are this table's sums."""
import importlib.util
import math
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).parents[1]

# (kind, what goes wrong, "file::test"); kind: input | kill | concurrent
CASES = [
    # security
    ("input", "SQL that reads outside the results, writes anywhere, changes settings or loads code",
     "bad_input/test_query.py::test_no_statement_reads_or_writes_outside_the_tables"),
    ("input", "the same through the CLI: one line, exit 2", "bad_input/test_query.py::test_the_cli_refuses_in_one_line_and_exits_2"),
    ("input", "DuckDB's spill folder", "bad_input/test_query.py::test_duckdbs_spill_folder_is_closed_too"),
    ("input", "an image or label larger than the pixel limit (a decompression bomb)",
     "bad_input/test_images.py::test_a_huge_image_is_refused_from_its_header_fast"),
    ("input", "a huge label file", "bad_input/test_images.py::test_a_huge_label_is_refused_before_decoding"),
    # wrong results written silently
    ("input", "evaluate on unfinished features", "bad_input/test_refusals.py::test_unfinished_features_are_refused_before_anything_is_written"),
    ("input", "evaluate before cluster", "bad_input/test_refusals.py::test_evaluate_before_cluster_is_refused_before_anything_is_written"),
    ("input", "evaluate with labels not written", "bad_input/test_refusals.py::test_labels_not_written_are_refused"),
    ("input", "evaluate with labels out of range", "bad_input/test_refusals.py::test_labels_out_of_range_are_refused"),
    ("input", "report on results without an evaluation", "bad_input/test_refusals.py::test_report_on_results_without_evaluations_names_what_to_run"),
    ("input", "an image in each PIL mode", "bad_input/test_images.py::test_every_mode_becomes_the_expected_8bit_rgb"),
    ("input", "modes without a defined white", "bad_input/test_images.py::test_modes_without_a_defined_white_are_refused_by_name"),
    ("input", "a mode PIL may add later", "bad_input/test_images.py::test_a_mode_pil_may_add_later_is_refused_by_name"),
    ("input", "a 16-bit grayscale image", "bad_input/test_images.py::test_16bit_gray_keeps_its_range_and_is_not_clipped_to_white"),
    ("input", "label values out of range outside the crop", "bad_input/test_images.py::test_label_values_are_checked_on_the_whole_file_not_the_crop"),
    ("input", "16-bit labels above 255", "bad_input/test_images.py::test_16bit_labels_within_0_255_load_and_above_are_refused"),
    ("input", "labels in other modes", "bad_input/test_images.py::test_labels_in_other_modes_are_refused_by_name"),
    ("input", "bad option values (reversed layer range, typos, bounds)", "test_config.py::test_bad_values_name_where_and_the_key"),
    ("input", "a run config with a bad key, value, model, path or comparison",
     "test_config.py::test_a_run_config_is_checked_whole_before_any_work"),
    ("input", "a run refused on its second split", "test_extract.py::test_a_run_refused_on_its_second_split_creates_nothing"),
    ("input", "cluster --force on some embeddings and layers", "test_cluster.py::test_force_on_some_embeddings_keeps_the_others"),
    ("input", "layers the model does not have", "bad_input/test_errors.py::test_a_layer_beyond_the_model_leaves_no_group_behind"),
    # malformed stores
    ("input", "an empty Zarr v2 group", "bad_input/test_stores.py::test_an_empty_zarr_v2_group_is_no_feature_store"),
    ("input", "a damaged zarr.json", "bad_input/test_stores.py::test_a_damaged_zarr_json_is_named_by_every_entry_point"),
    ("input", "a damaged group's metadata, met by a stage", "bad_input/test_stores.py::test_a_damaged_group_metadata_is_named_by_the_stages"),
    ("input", "a damaged array's metadata", "bad_input/test_stores.py::test_a_damaged_array_metadata_is_reported_by_array"),
    ("input", "truncated, missing and NaN chunks", "bad_input/test_stores.py::test_check_finds_each_bad_chunk_by_array_and_chunk"),
    ("input", "repair of bad feature and label chunks", "bad_input/test_stores.py::test_repair_marks_only_the_bad_chunks_pending"),
    ("input", "orphan files and a finished flag without its chunks",
     "bad_input/test_stores.py::test_orphan_files_and_a_finished_flag_without_its_chunks_are_found_and_repaired"),
    ("input", "a bad codebook layer", "bad_input/test_stores.py::test_a_bad_codebook_layer_is_marked_untrained"),
    ("input", "a chunk unreadable while evaluating", "bad_input/test_stores.py::test_a_chunk_unreadable_while_evaluating_is_named"),
    ("input", "a file or a folder of other files at the store path",
     "bad_input/test_stores.py::test_a_path_that_is_no_store_is_refused_before_any_work"),
    ("input", "a store on a read-only file system", "bad_input/test_stores.py::test_a_read_only_store_location_is_refused_before_any_work"),
    ("input", "a repaired store completed by the same extract", "test_extract.py::test_a_repaired_store_is_completed_by_the_same_extract_command"),
    # errors a person can act on
    ("input", "errors that need no model: before torch and Ray, one line",
     "bad_input/test_errors.py::test_errors_that_need_no_model_come_before_torch_and_ray"),
    ("input", "a misspelt pretrained tag", "bad_input/test_errors.py::test_a_misspelt_pretrained_tag_is_refused_even_with_random_weights"),
    ("input", "a checkpoint of another architecture", "bad_input/test_errors.py::test_a_checkpoint_of_another_architecture_is_summarised_not_listed"),
    ("input", "usage errors: a misspelt flag, a missing option, a bad value, an unknown command",
     "bad_input/test_errors.py::test_usage_errors_are_one_line_too"),
    ("input", "--debug after the command", "bad_input/test_errors.py::test_debug_works_after_the_command_too"),
    ("input", "a report with one bad comparison", "bad_input/test_refusals.py::test_a_report_with_one_bad_comparison_draws_nothing"),
    ("input", "an unexpected error (one line; --debug shows the traceback)",
     "bad_input/test_errors.py::test_unexpected_errors_are_one_line_and_debug_shows_the_traceback"),
    ("input", "hostile run configs: billion laughs, a key twice, a 5,000-digit number, deep nesting, Python tags",
     "bad_input/test_yaml.py::test_a_hostile_run_config_is_refused_naming_file_and_line"),
    ("input", "a binary file as a run config", "bad_input/test_yaml.py::test_a_binary_file_is_refused_as_not_text"),
    ("input", "a run config of many MB", "bad_input/test_yaml.py::test_a_huge_file_is_refused_from_its_size"),
    ("input", "a hostile -o option value", "bad_input/test_yaml.py::test_a_hostile_option_value_is_refused_by_its_key"),
    ("input", "a path holding rich markup and emoji codes, printed verbatim",
     "bad_input/test_markup.py::test_a_path_with_markup_and_emoji_codes_is_printed_verbatim"),
    ("input", "an image named like rich markup, named in full", "bad_input/test_markup.py::test_an_image_named_like_markup_is_named_in_full"),
    ("input", "a K or method given twice (--k 5,5): one codebook", "test_config.py::test_a_value_given_twice_in_a_list_option_counts_once"),
    # cases that passed before the hardening
    ("input", "corrupt, unlabelled-size and out-of-range images and labels", "test_datasets.py::test_bad_inputs_name_the_file"),
    ("input", "an empty split, a wrong root, unknown names", "test_datasets.py::test_empty_split_wrong_root_and_unknown_names"),
    ("input", "a corrupt image mid-run", "test_extract.py::test_corrupt_image_stops_the_run_and_keeps_finished_chunks"),
    ("input", "NaN/inf features", "test_extract.py::test_non_finite_features_name_the_images"),
    ("input", "a pickled object in a weights file", "test_registry.py::test_pickled_objects_are_refused"),
    ("input", "a store of another model or weights", "test_extract.py::test_store_of_another_model_is_refused_and_model_key_separates"),
    ("input", "weights of another architecture, strictly", "test_registry.py::test_strict_loading_names_file_and_keys"),
    # object storage
    ("input", "a bucket that does not exist, a prefix of other objects, an unknown URL scheme",
     "test_object_storage.py::test_a_store_url_that_cannot_be_used_is_refused_before_any_work"),
    ("input", "a torn chunk object in a bucket, found, repaired and recomputed; a codebook swapped in without rename",
     "test_object_storage.py::test_check_repair_and_codebook_replacement_on_object_storage"),
    ("input", "an endpoint that never answers: refused in seconds, in one line naming the URL and its variable",
     "bad_input/test_environment.py::test_an_endpoint_that_never_answers_fails_in_seconds_in_one_line"),
    ("input", "a FIFO among the images: named when the split is listed, before any work",
     "bad_input/test_special_files.py::test_extract_refuses_a_fifo_before_creating_the_store"),
    ("input", "an image file that yields no data in time", "bad_input/test_special_files.py::test_a_file_that_yields_no_data_in_time_is_named"),
    ("input", "a read-only HOME under a local Ray instance (its token kept in the environment)",
     "bad_input/test_environment.py::test_extract_on_ray_runs_with_a_read_only_home"),
    # schema 2 and the probes
    ("input", "a probe needing an array the store lacks (mid_tokens, class_<embedding>): named with the extract option",
     "test_probe.py::test_a_store_without_an_array_names_it_and_the_extract_option"),
    ("input", "a version-1 store read by every stage", "test_probe.py::test_a_version_1_store_stays_readable_by_every_stage"),
    ("input", "a block whose norm2 does not read x1 (ResPostBlock)",
     "test_capture.py::test_a_block_whose_norm2_is_not_before_the_mlp_is_refused_by_name"),
    # keypoint datasets and correspondence
    ("input", "a malformed SPair pair annotation: each field, named with its file",
     "test_spair.py::test_a_malformed_annotation_is_refused_naming_the_file_and_field"),
    ("input", "SPair files missing or unreadable", "test_spair.py::test_files_that_are_missing_or_unreadable_are_named"),
    ("input", "SPair pair lists missing or repeating a pair",
     "test_spair.py::test_pair_lists_that_are_missing_or_repeat_a_pair_are_named"),
    ("input", "partpairs into an existing folder, or failing midway",
     "test_partpairs.py::test_an_existing_output_is_refused_and_an_error_leaves_nothing"),
    ("input", "correspond without keypoint pairs or a captured embedding",
     "test_correspond.py::test_refusals_name_what_is_missing"),
    ("input", "explain with other weights or a block not captured: refused before anything is written",
     "test_explain.py::test_other_weights_are_refused_before_anything_is_written"),
    ("input", "explain with a data root of other images", "test_explain.py::test_real_coco_stuff_images_are_read_again_and_checked"),
    ("input", "an unknown geometry", "test_geometry.py::test_geometry_is_an_option_of_every_dataset_and_part_of_the_fingerprint"),
    # kill points
    ("kill", "Ctrl-C during extract", "test_extract.py::test_interrupted_run_resumes_to_the_single_run_result"),
    ("kill", "a chunk half written", "test_extract.py::test_half_written_chunk_is_redone"),
    ("kill", "a killed actor", "test_extract.py::test_killed_actor_is_restarted_and_its_range_retried"),
    ("kill", "a SIGKILLed driver with chunks in flight", "test_extract.py::test_killed_driver_resumes_to_the_single_run_result"),
    ("kill", "a SIGKILLed driver's own Ray instance", "bad_input/test_interrupts.py::test_a_killed_driver_leaves_no_ray_process_behind"),
    ("kill", "a worker node of a Ray cluster killed mid-extract", "test_multinode.py::test_an_extract_survives_a_killed_worker_node"),
    ("kill", "a SIGKILLed driver writing to object storage",
     "test_object_storage.py::test_a_killed_driver_resumes_on_object_storage_to_the_single_run_result"),
    ("kill", "a full file system during extract", "bad_input/test_interrupts.py::test_a_full_disk_stops_the_run_keeps_finished_chunks_and_resumes"),
    ("kill", "Ctrl-C during cluster", "test_cluster.py::test_interrupted_run_writes_nothing_half_trained_and_resumes"),
    ("kill", "Ctrl-C during cluster --force", "test_cluster.py::test_an_interrupted_force_keeps_the_finished_codebooks"),
    ("kill", "evaluate failing midway", "bad_input/test_refusals.py::test_features_found_broken_midway_leave_the_results_as_they_were"),
    # concurrent runs
    ("concurrent", "two extracts of one model group started together",
     "bad_input/test_concurrency.py::test_two_extracts_started_together_one_works_one_is_refused"),
    ("concurrent", "cluster and evaluate while another run holds their outputs",
     "bad_input/test_concurrency.py::test_cluster_and_evaluate_on_the_same_outputs_are_refused_while_one_runs"),
    ("concurrent", "a live holder", "bad_input/test_concurrency.py::test_a_live_holder_is_refused_by_name"),
    ("concurrent", "a dead holder (this host, or silent past the time to live)",
     "bad_input/test_concurrency.py::test_a_dead_holders_lease_is_taken_over"),
    ("concurrent", "several takers of one stale lease", "bad_input/test_concurrency.py::test_of_several_takers_of_a_stale_lease_exactly_one_wins"),
    ("concurrent", "a long holder's heartbeat", "bad_input/test_concurrency.py::test_the_heartbeat_keeps_a_long_holder_alive"),
    ("concurrent", "a second writer on object storage, and a stale lease there (conditional writes)",
     "test_object_storage.py::test_a_lease_on_object_storage_refuses_a_second_writer_and_is_taken_over_when_stale"),
    ("concurrent", "several takers of one stale lease on object storage",
     "test_object_storage.py::test_two_takers_of_a_stale_lease_never_both_win"),
]


def _function(node: str):
    path, name = node.split("::")
    spec = importlib.util.spec_from_file_location(f"catalogue_{Path(path).stem}", TESTS / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name, None)


def _cases(func) -> int:
    """How many cases a test runs: the product of its parametrisations."""
    marks = [m for m in getattr(func, "pytestmark", []) if m.name == "parametrize"]
    return math.prod(len(m.args[1]) for m in marks) if marks else 1


def totals() -> dict[str, int]:
    out = {"input": 0, "kill": 0, "concurrent": 0}
    for kind, _, node in CASES:
        out[kind] += _cases(_function(node))
    return out


@pytest.mark.parametrize("node", [c[2] for c in CASES])
def test_every_row_names_a_test_that_exists(node):
    assert callable(_function(node)), node


def test_the_readme_quotes_this_tables_totals():
    readme = (TESTS.parent / "README.md").read_text()
    section = readme.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    t = totals()
    quoted = {kind: int(re.search(rf"\*\*(\d+)\*\* {word}", section).group(1))
              for kind, word in (("input", "bad-input cases"), ("kill", "kill points"),
                                 ("concurrent", "concurrent-run cases"))}
    assert quoted == t, f"README says {quoted}, the catalogue counts {t}"
