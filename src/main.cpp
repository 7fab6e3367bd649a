// titan_train: reads the job config (TOML + CLI overrides), builds the trainer, trains.
#include <exception>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include <cstdlib>

#include <c10/util/Exception.h>

#include "titan/checkpoint/hf.h"
#include "titan/config/job_config.h"
#include "titan/dist/launch.h"
#include "titan/parallel/pipeline/schedule.h"
#include "titan/train/trainer.h"
#include "titan/util/device.h"
#include "titan/util/error.h"
#include "titan/util/fs.h"
#include "titan/util/log.h"
#include "titan/util/strings.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  // The subcommands have their own --help.
  const bool subcommand = !args.empty() && (args[0] == "convert" || args[0] == "schedule");
  for (const auto& a : subcommand ? std::vector<std::string>() : args) {
    if (a == "--help" || a == "-h") {
      std::cout << titan::config::help_text();
      return 0;
    }
    if (a == "--help-markdown") {
      std::cout << titan::config::markdown_reference();
      return 0;
    }
  }
  // As torchtitan's launcher does: expandable segments keep the CUDA caching allocator's
  // reserved memory close to what tensors hold (FSDP's per-unit buffers, freed on the
  // communication stream's schedule, otherwise fragment it). Must precede the first CUDA
  // allocation; a user's own setting wins.
  const bool alloc_conf_default =
      !std::getenv("PYTORCH_ALLOC_CONF") && !std::getenv("PYTORCH_CUDA_ALLOC_CONF");
  if (alloc_conf_default) setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True", 0);
  try {
    if (!args.empty() && args[0] == "schedule") {
      return titan::parallel::pipeline::run_schedule_command(
          std::vector<std::string>(args.begin() + 1, args.end()));
    }
    if (!args.empty() && args[0] == "convert") {
      titan::log::init(-1, true, false);
      return titan::checkpoint::run_convert(std::vector<std::string>(args.begin() + 1, args.end()));
    }
    titan::config::JobConfig config = titan::config::load_job_config(args);
    const auto env = titan::dist::read_launch_env();
    // Rank 0 logs; LOG_RANK=all (or a list such as 0,3) shows others too.
    bool show = env.rank == 0;
    if (const char* lr = std::getenv("LOG_RANK")) {
      const std::string wanted = lr;
      show = wanted == "all";
      for (const auto& r : titan::util::split(wanted, ',')) {
        if (titan::util::trim(r) == std::to_string(env.rank)) show = true;
      }
    }
    titan::log::init(env.world_size > 1 ? env.rank : -1, show,
                     titan::log::colors_wanted(config.metrics.disable_color_printing));
    if (config.job.print_config && show) {
      // Without job.config_file, so that the printed config runs as a job file itself.
      titan::config::JobConfig printed = config;
      printed.job.config_file.clear();
      std::cout << "# resolved job config"
                << (config.job.config_file.empty()
                        ? ""
                        : " (" + config.job.config_file + " and the command line)")
                << "\n"
                << titan::config::to_toml(printed) << std::flush;
    }
    if (!config.job.save_config_file.empty() && env.rank == 0) {
      // Under the dump folder (an absolute name stands), as torchtitan's os.path.join.
      const std::filesystem::path path =
          std::filesystem::path(config.job.dump_folder) / config.job.save_config_file;
      if (path.has_parent_path()) titan::util::make_directories(path.parent_path().string());
      // Without the file names: a job started from the saved file must not rewrite it.
      titan::config::JobConfig saved = config;
      saved.job.config_file.clear();
      saved.job.save_config_file.clear();
      titan::util::write_file_atomically(
          path.string(), path.extension() == ".json"
                             ? titan::config::to_json(saved)
                             : "# resolved job config\n" + titan::config::to_toml(saved));
      titan::log::info("job: resolved config written to {}", path.string());
    }
    titan::log::info("job: {}{}", config.job.description,
                     config.job.config_file.empty() ? "" : " (" + config.job.config_file + ")");
    if (alloc_conf_default) {
      titan::log::debug("PYTORCH_ALLOC_CONF unset: using expandable_segments:True");
    }
    titan::train::Trainer trainer(std::move(config));
    trainer.train();
    return 0;
  } catch (const titan::Error& e) {
    std::cerr << "titan_train: error: " << e.what() << std::endl;
    return 2;
  } catch (const c10::OutOfMemoryError& e) {
    // The user's problem (model, batch or plan too large for the device), not a bug.
    std::cerr << "titan_train: error: " << titan::out_of_memory_report(e.what_without_backtrace())
              << std::endl;
    if (std::getenv("TITAN_BACKTRACE")) std::cerr << e.what() << std::endl;
    return 2;
  } catch (const c10::Error& e) {
    if (titan::is_host_allocation_failure(e.what_without_backtrace())) {
      std::cerr << "titan_train: error: "
                << titan::host_out_of_memory_report(e.what_without_backtrace()) << std::endl;
      return 2;
    }
    std::cerr << "titan_train: internal error: "
              << (std::getenv("TITAN_BACKTRACE") ? e.what() : e.what_without_backtrace())
              << std::endl;
    return 3;
  } catch (const std::bad_alloc&) {
    std::cerr << "titan_train: error: "
              << titan::host_out_of_memory_report("a host allocation failed (std::bad_alloc)")
              << std::endl;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "titan_train: internal error: " << e.what() << std::endl;
    return 3;
  }
}
